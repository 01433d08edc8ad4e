"""A worker's Prometheus metrics (`itsd worker --metrics-port N`): jobs, their seconds by stage, pixels, how
busy it is, what it serves, and whether it is ready, on `/metrics`; readiness on `/ready`.

Jobs run in Celery's pool processes, so the metrics use prometheus_client's multiprocess mode: each process
writes its values to files in one folder (PROMETHEUS_MULTIPROC_DIR, set by `enable` before prometheus_client
is imported, and inherited by the pool processes forked later), and the worker's main process serves their
sum. Live gauges (busy, ready) count only processes that are alive: the files of a pool process that died,
even by SIGKILL, are dropped before each scrape.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from core.holds import process_alive
from core.job import Result

# seconds: a tiny model's job is milliseconds, an SD1.5 photo on a CPU is minutes
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))
_LIVE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db$")


def enable() -> Path:
    """Multiprocess mode in a fresh folder; call before anything imports prometheus_client."""
    folder = Path(tempfile.mkdtemp(prefix="itsd-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


class WorkerMetrics:
    """The metrics a worker's processes update (`worker.jobs.EditService` calls these)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: in multiprocess mode the values live in files, and the server reads those
        self.jobs = Counter(
            "itsd_jobs_total",
            "Jobs ended, by model and status (done, skipped, failed, cancelled), and attempts retried or dead-lettered",
            ["model", "status"],
            registry=None,
        )
        self.job_seconds = Histogram(
            "itsd_job_seconds", "Seconds a done job took, by model", ["model"], buckets=BUCKETS, registry=None
        )
        self.stage_seconds = Histogram(
            "itsd_stage_seconds",
            "Seconds per stage of a done job (read, decode, edit and its models edit.*, encode, write)",
            ["stage"],
            buckets=BUCKETS,
            registry=None,
        )
        self.pixels = Counter("itsd_images_pixels_total", "Output pixels written, by model", ["model"], registry=None)
        self.busy = Gauge("itsd_worker_busy", "Jobs running now", multiprocess_mode="livesum", registry=None)
        self.ready = Gauge(
            "itsd_worker_ready",
            "Processes that have loaded and warmed up their models and take jobs",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.info = Gauge(
            "itsd_model_info",
            "A model this worker serves (value 1), with its identity and what runs it",
            ["model", "model_id", "runtime", "provider"],
            multiprocess_mode="max",
            registry=None,
        )

    def served(self, model: str, model_id: str, label: str | None) -> None:
        """`label` is the backend's: "onnxruntime CUDAExecutionProvider", "openvino bf16"."""
        runtime, _, provider = (label or "?").partition(" ")
        self.info.labels(model, model_id, runtime, provider).set(1)

    @contextmanager
    def running(self) -> Iterator[None]:
        self.busy.inc()
        try:
            yield
        finally:
            self.busy.dec()

    def ended(self, model: str, result: Result) -> None:
        self.jobs.labels(model, result.status).inc()
        if result.status != "done":
            return
        if result.started_at is not None and result.finished_at is not None:
            self.job_seconds.labels(model).observe(result.finished_at - result.started_at)
        for stage, seconds in result.timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        self.pixels.labels(model).inc((result.width or 0) * (result.height or 0))

    def attempt(self, model: str, outcome: str) -> None:
        """An attempt that did not end the job (`retried`) or ended it in the dead-letter list (`dead`)."""
        self.jobs.labels(model, outcome).inc()


def _drop_dead_processes(folder: Path) -> None:
    from prometheus_client import multiprocess

    for path in glob.glob(str(folder / "gauge_live*.db")):
        match = _LIVE_FILE.search(path)
        if match and not process_alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), str(folder))


class MetricsServer:
    """`/metrics` (the sum over the worker's processes) and `/ready` (200 once a process takes jobs, else 503),
    served from the worker's main process on a thread."""

    def __init__(self, folder: Path, port: int, host: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, multiprocess

        self.folder = folder
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, str(folder))
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="itsd-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        _drop_dead_processes(self.folder)
        return generate_latest(self.registry)

    def ready(self) -> bool:
        _drop_dead_processes(self.folder)
        for family in self.registry.collect():
            if family.name == "itsd_worker_ready":
                return any(sample.value > 0 for sample in family.samples)
        return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                from prometheus_client import CONTENT_TYPE_LATEST

                if self.path.split("?")[0] == "/metrics":
                    self._send(200, server.scrape(), CONTENT_TYPE_LATEST)
                elif self.path == "/ready":
                    ok = server.ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"warming up\n", "text/plain")
                else:
                    self._send(404, b"try /metrics or /ready\n", "text/plain")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds: not worth a log line each
                return

        return Handler
