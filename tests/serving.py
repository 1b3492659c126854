"""`cnnlab serve` in a subprocess, for the server and web page tests, and image headers that claim
more pixels than they hold."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import httpx

from benchmarks.deploy import server_url

START_TIMEOUT = 120  # seconds: importing torch and loading the model on a busy machine


class Server(NamedTuple):
    url: str
    process: subprocess.Popen


@contextmanager
def running_server(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python -m cnnlab serve RUN_DIR --port 0 ARGS` and yield its base URL once /healthz answers."""
    with server_process(run_dir, *args, env=env) as server:
        yield server.url


@contextmanager
def server_process(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """As `running_server`, yielding the process too (for its pid and whether it is still alive).

    The port comes from the server's own "serving ... at http://..." line; CNNLAB_API_KEY is
    removed from the environment unless `env` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "CNNLAB_API_KEY"} | (env or {})
    with tempfile.NamedTemporaryFile("w+", prefix="cnnlab-serve-", suffix=".log") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(run_dir), "--port", "0", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=environ)
        try:
            url = server_url(proc, Path(log.name), START_TIMEOUT)
            _wait_healthy(url)
            yield Server(url, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/healthz did not answer within {START_TIMEOUT} s")


# --- headers of decompression bombs: a few bytes claiming width x height pixels, no pixel data -------

def png_header(width: int, height: int) -> bytes:
    """A valid PNG claiming width x height grayscale pixels, with no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _gif_header(width: int, height: int) -> bytes:  # up to 65535 a side
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)  # no global colour table
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x00"  # LZW code size, no data
    return b"GIF89a" + screen + frame + b";"


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)  # 24-bit, uncompressed
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def _jpeg_header(width: int, height: int) -> bytes:  # up to 65535 a side
    frame = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"  # baseline, 1 component
    scan = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + frame + scan + b"\xff\xd9"


def _tiff_header(width: int, height: int) -> bytes:
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 2**31),  # data: past
            (277, 3, 1), (278, 4, height), (279, 4, width * height % 2**32)]  # the end; (tag, 3 short/4 long, value)
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"


def _webp_header(width: int, height: int) -> bytes:  # an extended-format canvas, up to 2**24 a side
    canvas = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(canvas)) + canvas
    return b"RIFF" + struct.pack("<I", len(body)) + body


BOMB_HEADERS = {"PNG": png_header, "GIF": _gif_header, "BMP": _bmp_header, "JPEG": _jpeg_header,
                "TIFF": _tiff_header, "WEBP": _webp_header}
