"""Shared fixtures: a tiny InstructPix2Pix checkpoint and its ONNX export, built once per session; a producer's
broker on a module's redis-server."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the Hub
os.environ.setdefault("ITSD_PROVIDERS", "CPUExecutionProvider")
os.environ.setdefault("ITSD_RUNTIME", "onnxruntime")  # OpenVINO's tests ask for it by name (test_runtimes.py)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ip2p", seed=0)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("artifacts") / "tiny-onnx"
    export_checkpoint(str(tiny_checkpoint), out)
    return out


@pytest.fixture
def broker(redis):
    """A producer's `Broker` on the module's own redis-server (its `redis` fixture), emptied first: a broker no
    worker has ever used."""
    from core.settings import Settings
    from producer.batch import Broker

    broker = Broker(redis.url, Settings())
    broker.client.flushdb()
    return broker


def photo(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB test image (gradients plus a little texture)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture
def tmpfs(tmp_path: Path):
    """`mount(name, size, read_only)`: a real tmpfs of `size` bytes at tmp_path/name (a disk that can be full,
    or read-only), unmounted after. Mounting needs root, as on this project's machines and CI."""
    import subprocess

    mounted: list[Path] = []

    def mount(name: str, size: int, read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


@pytest.fixture
def listener():
    """A real HTTP server on a loopback port that answers any GET or HEAD with a small PNG, and records every
    connection made to it: yields `(port, contacts)`. A test that must reach nothing asserts `contacts == []`."""
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    buffer = io.BytesIO()
    photo(8, 8).save(buffer, format="PNG")
    body = buffer.getvalue()

    class Answer(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def do_GET(self) -> None:
            self.do_HEAD()
            self.wfile.write(body)

    contacts: list[tuple[str, int]] = []

    class Recording(ThreadingHTTPServer):
        def verify_request(self, request, client_address) -> bool:  # every connection, even one that sends nothing
            contacts.append(client_address)
            return True

    server = Recording(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], contacts
    server.shutdown()
    server.server_close()
