"""A short soak of a real `cnnlab serve`: 32 clients sending valid and malformed uploads mixed.
No valid request may be dropped or answered wrong, none may get a 5xx, and memory stays bounded.
The 60 s version is `python -m benchmarks soak RUN_DIR`."""

from __future__ import annotations

from serving import server_process

from benchmarks.deploy import SOAK_SERVE_ARGS, soak, soak_posts

CLIENTS = 32
SECONDS = 8
# Why 100 MiB: at most 32 requests are in flight, each body under ~0.2 MB (SOAK_MAX_BYTES) held a few
# times over (socket buffer, spooled part, bytes read): ~20 MiB. Decoded images are 28x28, and the
# too-large image is refused from its header. The rest is room for the malloc arenas of up to 40
# decoding threads. Growth past it is memory kept per request, which grows with the traffic.
RSS_GROWTH_LIMIT_MIB = 100


def test_32_clients_mixing_valid_and_malformed_uploads(fmnist_run, fmnist_test_images):
    with server_process(fmnist_run, *SOAK_SERVE_ARGS) as server:
        posts = soak_posts(fmnist_run, fmnist_test_images[0], invalid_share=0.5)
        result = soak(server.url, server.process.pid, posts, CLIENTS, SECONDS)
        assert server.process.poll() is None
    print(f"\nsoak: {result}")
    assert result["valid_failed"] == 0, result["first_failures"]
    assert result["server_errors"] == 0 and result["invalid_unexpected_status"] == 0, result
    assert result["valid_ok"] > 0 and result["invalid_4xx"] > 0, result
    assert result["rss_max_mib"] < result["rss_start_mib"] + RSS_GROWTH_LIMIT_MIB, result
