"""Prometheus metrics of `cnnlab serve`, exposed at /metrics through prometheus-client.

Each application keeps its own registry (several apps in one process, as in the tests, do not
mix counts). Routes are labelled by their template (`/v2/models/{name}/infer`), never by the
raw path, so a client cannot grow the label set without bound.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# request latency in seconds: from a millisecond (a health check) to tens of seconds (a stalled upload)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # images per forward pass
UNMATCHED = "unmatched"  # the route label of a request no route took (a 404)


class ServeMetrics:
    """The server's counters, histograms and gauges; `render()` is the /metrics page."""

    def __init__(self, model: dict[str, str], queue_depth: Callable[[], float],
                 requests_in_progress: Callable[[], float]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("cnnlab_http_requests", "HTTP requests answered, by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("cnnlab_http_request_duration_seconds",
                                 "Time from a request's arrival to the end of its answer, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("cnnlab_batch_images", "Images per forward pass of the model",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("cnnlab_images", "Images classified", registry=r)
        self.rejected = Counter("cnnlab_rejected_requests", "Requests refused with 503 because the queue was full",
                                registry=r)
        Gauge("cnnlab_queue_images", "Images waiting for a forward pass", registry=r).set_function(queue_depth)
        Gauge("cnnlab_requests_in_progress", "Classification requests admitted and not yet answered (at most "
              "--max-queue)", registry=r).set_function(requests_in_progress)
        Info("cnnlab_model", "The model being served", registry=r).info(model)

    def observe_batch(self, images: int) -> None:
        self.batch_images.observe(images)
        self.images.inc(images)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Count and time every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # set by the router on the scope it was given
            label = getattr(route, "path", None) or UNMATCHED
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
