"""The operator's command line (producer/views.py): `itsd workers` and `itsd status --watch`, against real
workers and a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fleet import itsd, photo_folder, submit, workers

from core.records import Keys
from core.redis_url import redis_client
from producer.local import RedisServer
from producer.views import worker_rows

ITSD = [sys.executable, "-m", "producer.cli"]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.mark.slow
def test_workers_lists_who_serves_what_on_what_and_forgets_a_worker_that_stopped(redis, tiny_artifacts, tmp_path):
    spec = {"a": str(tiny_artifacts)}
    with workers(redis, tmp_path, spec, spec, env={"ITSD_BATCH_JOBS": "1"}):
        listed = itsd(redis.url, "workers", "--json")
        text = itsd(redis.url, "workers").stdout
    rows = json.loads(listed.stdout)
    assert [r["state"] for r in rows] == ["up", "up"]
    # named as Celery names them in results (`itsd status`): --hostname w0@%h expanded, not kept as typed
    assert sorted(r["worker"] for r in rows) == [f"w{i}@{os.uname().nodename}" for i in range(2)]
    for row in rows:
        assert row["models"]["a"]["runtime"] == "onnxruntime CPUExecutionProvider"
        assert row["device"] == "auto" and row["concurrency"] == 1
    assert "a (onnxruntime CPUExecutionProvider)" in text and "up" in text
    assert itsd(redis.url, "workers", "--json").stdout.strip() == "[]"  # a clean stop removes its record


def test_a_worker_that_missed_three_heartbeats_is_shown_as_gone(redis):
    client = redis_client(redis.url)
    client.hset(Keys.workers, "ghost@host", json.dumps({"models": {}, "seen_at": 1000.0}))
    try:
        (ghost,) = [r for r in worker_rows(client, now=1000.0 + 50) if r["worker"] == "ghost@host"]
        assert ghost["state"] == "gone"
        assert [r["state"] for r in worker_rows(client, now=1000.0 + 10) if r["worker"] == "ghost@host"] == ["up"]
    finally:
        client.hdel(Keys.workers, "ghost@host")


@pytest.mark.slow
def test_status_watch_follows_a_batch_to_its_end_with_rates_and_the_latest_failures(redis, tiny_artifacts, tmp_path):
    inputs = photo_folder(tmp_path / "in", 6, (128, 96), broken=True)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Derain", "--steps", "20", "--seed", "1")
        batch = run.stdout.split("batch ", 1)[1].split(":", 1)[0]
        watching = subprocess.run(
            [*ITSD, "status", batch, "--watch", "--interval", "0.2"],
            env={**os.environ, "ITSD_BROKER_URL": redis.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert watching.returncode == 0, watching.stderr
    frames = watching.stdout.split(f"batch {batch} (")
    assert len(frames) > 2  # it redrew while the batch ran
    last = frames[-1]
    assert last.startswith("finished): 6 done, 0 skipped, 1 failed, 0 cancelled of 7"), last
    assert "img/s" in last and "w0@" in last and "latest failures:" in last
    assert f"{inputs / 'broken.png'}: invalid_image" in last  # named by its input
