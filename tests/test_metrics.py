"""Metrics an operator scrapes: a worker's /metrics and /ready (worker/metrics.py) after a real batch on real
pool processes, and `itsd metrics`, the queue exporter (producer/metrics.py), against a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fleet import photo_folder, submit, workers
from prometheus_client.parser import text_string_to_metric_families

from core.manifest import Manifest
from core.records import Keys
from core.redis_url import redis_client
from producer.local import RedisServer, free_port

STEPS = ["--steps", "2", "--seed", "7"]
ITSD = [sys.executable, "-m", "producer.cli"]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while scrape_when_up(port, "/ready")[0] != 200:
        assert time.monotonic() < deadline, "the worker never said it was ready"
        time.sleep(0.2)


def test_worker_metrics_after_a_real_batch_count_its_results(redis, tiny_artifacts, tmp_path):
    inputs = photo_folder(tmp_path / "in", 4, (64, 48), broken=True)
    port = free_port()
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, concurrency=2, env={"ITSD_METRICS_PORT": str(port)}):
        wait_ready(port)
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Derain", "--wait", *STEPS)
        status, text = scrape(port)
    assert run.returncode == 1 and "4 done" in run.stdout, run.stdout + run.stderr
    assert status == 200
    found = samples(text)
    assert found[("itsd_jobs_total", (("model", "a"), ("status", "done")))] == 4
    assert found[("itsd_jobs_total", (("model", "a"), ("status", "failed")))] == 1
    assert found[("itsd_job_seconds_count", (("model", "a"),))] == 4
    assert found[("itsd_stage_seconds_count", (("stage", "edit.unet"),))] == 4
    assert found[("itsd_images_pixels_total", (("model", "a"),))] == 4 * 64 * 48
    assert found[("itsd_worker_busy", ())] == 0
    assert found[("itsd_worker_ready", ())] == 2  # both pool processes warmed up
    model_id = Manifest.read(tiny_artifacts).model_id
    info = [labels for (name, labels), _ in found.items() if name == "itsd_model_info"]
    assert info == [
        (
            ("model", "a"),
            ("model_id", model_id),
            ("provider", "CPUExecutionProvider"),
            ("runtime", "onnxruntime"),
        )
    ]


@pytest.mark.slow
def test_the_queue_exporter_counts_waiting_reserved_and_running_jobs_per_model(redis, tiny_artifacts, tmp_path):
    inputs = photo_folder(tmp_path / "in", 4, (256, 256))
    client = redis_client(redis.url)
    client.lpush("itsd.idle", b"{}")  # a queue no worker has registered (a model scaled to zero) still shows
    port = free_port()
    exporter = subprocess.Popen(
        [*ITSD, "metrics", "--port", str(port), "--host", "127.0.0.1"],
        env={**os.environ, "ITSD_BROKER_URL": redis.url},
        stderr=subprocess.PIPE,
    )
    try:
        with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):  # one process: one job at a time
            run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Derain", "--steps", "400", "--seed", "1")
            batch = run.stdout.split("batch ", 1)[1].split(":", 1)[0]
            deadline = time.monotonic() + 60
            while not list(client.scan_iter(match=Keys.claim("*"))):
                assert time.monotonic() < deadline, "no job started"
                time.sleep(0.05)
            found = samples(scrape_when_up(port)[1])
        redis.stop()
        try:
            down = samples(scrape_when_up(port)[1])
        finally:
            redis.start()
    finally:
        exporter.terminate()
        exporter.wait(10)
    assert down == {("itsd_redis_up", ()): 0}  # within the scrape, not after a minute of retries
    assert found[("itsd_redis_up", ())] == 1
    assert found[("itsd_queue_depth", (("model", "a"),))] == 3
    assert found[("itsd_queue_depth", (("model", "idle"),))] == 1
    assert found[("itsd_jobs_reserved", (("model", "a"),))] == 1
    assert found[("itsd_jobs_running", ())] == 1
    assert found[("itsd_batch_total", (("batch", batch),))] == 4
    assert found[("itsd_batch_jobs", (("batch", batch), ("status", "done")))] == 0


def test_the_queue_exporter_as_pid_1_stops_on_sigterm_as_a_container_stop_sends_it(redis):
    # PID 1 of a pid namespace, as in a container (`docker stop`, a pod's termination): the kernel gives it no
    # default action for SIGTERM, so it stops only if it handles the signal itself
    port = free_port()
    own_user = [] if os.getuid() == 0 else ["--user", "--map-root-user"]
    exporter = subprocess.Popen(
        ["unshare", *own_user, "--pid", "--fork", *ITSD, "metrics", "--port", str(port), "--host", "127.0.0.1"],
        env={**os.environ, "ITSD_BROKER_URL": redis.url},
    )
    try:
        assert scrape_when_up(port)[0] == 200
        children = Path(f"/proc/{exporter.pid}/task/{exporter.pid}/children").read_text()
        (pid_1,) = (int(p) for p in children.split())  # unshare's child: PID 1 of its namespace
        os.kill(pid_1, signal.SIGTERM)
        assert exporter.wait(20) == 0
    finally:
        exporter.kill()


def scrape_when_up(port: int, path: str = "/metrics", timeout: float = 30) -> tuple[int, str]:
    """`scrape`, waiting while nothing listens on the port yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port, path)
        except urllib.error.URLError:
            assert time.monotonic() < deadline, "the exporter never came up"
            time.sleep(0.2)
