"""The fleet, for real: a redis-server, `itsd worker` processes (Celery prefork), tiny exported models,
and the `itsd` CLI in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo
from fleet import itsd, photo_folder, submit, workers
from photos import check_collection, photo_collection
from PIL import Image

from core.images import psnr
from core.queue import TASK_NAME
from core.records import Keys, status_counts
from core.redis_url import redis_client
from producer.cli import itsd as itsd_group
from producer.local import LocalWorker, RedisServer, wait_registered

STEPS = ["--steps", "2", "--seed", "7", "--max-side", "64"]
ITSD = [sys.executable, "-m", "producer.cli"]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def second_artifacts(tmp_path_factory):
    """Another model (different weights, so a different identity) for routing tests."""
    from export.exporter import export_checkpoint
    from training.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt2") / "m2", seed=1)
    out = tmp_path_factory.mktemp("art2") / "m2-onnx"
    export_checkpoint(str(ckpt), out, verify_parity=False)
    return out


def photos(folder: Path, count: int, size: tuple[int, int] = (64, 48)) -> Path:
    for i in range(count):
        target = folder / f"set{i % 3}" / f"p{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        photo(*size, seed=i).save(target)
    return folder


def batch_id(output: str) -> str:
    return output.split("batch ", 1)[1].split(":", 1)[0]


@pytest.mark.slow
def test_fifty_images_match_itsd_edit_and_a_second_submit_recomputes_nothing(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 50)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, concurrency=2):
        first = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize it", "--wait", *STEPS)
        assert first.returncode == 0, first.stderr
        assert "50 done, 0 skipped" in first.stdout
        again = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize it", "--wait", *STEPS)
        assert again.returncode == 0 and "0 queued, 50 already done" in again.stdout
        assert batch_id(again.stdout) == batch_id(first.stdout)
        status = itsd(redis.url, "status", batch_id(first.stdout), "--json")
    summary = json.loads(status.stdout)
    assert summary["counts"]["done"] == 50 and sum(w["done"] for w in summary["workers"].values()) == 50
    reference = CliRunner().invoke(
        itsd_group,
        [
            "edit",
            str(inputs),
            "-m",
            str(tiny_artifacts),
            "-i",
            "Cartoonize it",
            "-o",
            str(tmp_path / "ref"),
            "-q",
            *STEPS,
        ],
    )
    assert reference.exit_code == 0, reference.output
    outputs = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.png"))
    assert outputs == sorted(p.relative_to(inputs) for p in inputs.rglob("*.png"))
    for relative in outputs:
        fleet = np.asarray(Image.open(tmp_path / "out" / relative))
        assert np.array_equal(fleet, np.asarray(Image.open(tmp_path / "ref" / relative))), relative


@pytest.mark.slow  # a real fleet: in CI's full run, kept out of the inner loop
def test_submit_fetches_no_url_the_workers_refuse_and_each_bad_input_fails_alone_by_line(
    redis, tiny_artifacts, tmp_path, listener
):
    port, contacts = listener
    photos(tmp_path / "in", 1)
    refused = [f"ftp://127.0.0.1:{port}/b.png", f"http://127.0.0.1:{port}/c.png"]
    manifest = tmp_path / "in" / "jobs.jsonl"
    rows = [{"input": "set0/p000.png"}, {"input": refused[0]}, {"input": refused[1], "output": "c.png"}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    url = f"http://127.0.0.1:{port}/d.png"
    env = {"ITSD_URL_SCHEMES": "file"}  # as the workers': local paths only
    args = ["submit", str(manifest), url, "-i", "Cartoonize", "-m", "a", "-o", str(tmp_path / "out"), *STEPS]
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env=env):
        run = itsd(redis.url, *args, "--wait", env=env)
        again = itsd(redis.url, *args, env=env)  # without --wait: the same batch, its refusals said at once
        to_url = itsd(
            redis.url, "submit", str(manifest), "-i", "x", "-m", "a", "-o", f"http://127.0.0.1:{port}/o", env=env
        )
    assert run.returncode == 1 and "1 done, 0 skipped (already there), 3 failed of 4" in run.stdout, run.stderr
    assert "Traceback" not in run.stderr and "no such file" not in run.stderr
    said = [
        f"{manifest}:2: {refused[0]}: ftp://",
        f"{manifest}:3: {refused[1]}: http://",
        f"outside_roots: {url}: http://",  # the input named once
    ]
    for line in said:
        assert f"{line} is not allowed (allowed: file; ITSD_URL_SCHEMES)" in run.stderr, run.stderr
        assert f"{line} is not allowed" in again.stderr, again.stderr
    assert again.returncode == 0 and "0 queued, 1 already done, 3 refused" in again.stdout
    assert to_url.returncode == 2 and "http:// is not allowed" in to_url.stderr
    assert (tmp_path / "out" / "set0" / "p000.png").is_file()
    assert contacts == []


def test_a_corrupt_image_fails_alone_with_its_reason(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 4)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize", "--wait", *STEPS)
    assert run.returncode == 1
    assert "4 done" in run.stdout and "1 failed" in run.stdout
    assert "invalid_image: cannot decode" in run.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4


@pytest.mark.slow
def test_fleet_jobs_give_each_photo_back_its_metadata_in_every_format_and_strip_gps_when_asked(
    redis, tiny_artifacts, tmp_path
):
    inputs = photo_collection(tmp_path / "in", photo(64, 48))
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):
        kept = submit(redis.url, str(inputs), str(tmp_path / "out"), "Derain", "--wait", *STEPS)
        stripped = submit(redis.url, str(inputs), str(tmp_path / "pub"), "Derain", "--wait", "--strip-gps", *STEPS)
    assert kept.returncode == 0 and "7 done" in kept.stdout, kept.stdout + kept.stderr
    assert stripped.returncode == 0 and "7 done" in stripped.stdout, stripped.stdout + stripped.stderr
    check_collection(tmp_path / "out", (64, 48))
    check_collection(tmp_path / "pub", (64, 48), gps=False)


@pytest.mark.slow  # a real fleet: in CI's full run, kept out of the inner loop
def test_identical_files_at_two_paths_and_a_relative_input_each_get_their_own_output(redis, tiny_artifacts, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        photo(64, 48, seed=1).save(tmp_path / "in" / folder / "same.png")  # the same bytes twice
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):  # the workers run in the repository's folder
        run = submit(redis.url, Path("in"), tmp_path / "out", "Cartoonize", "--wait", *STEPS, cwd=tmp_path)
    assert run.returncode == 0 and "2 done" in run.stdout, run.stdout + run.stderr
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a/same.png", "b/same.png"]


@pytest.mark.slow
def test_two_models_are_routed_to_their_own_queues(redis, tiny_artifacts, second_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 6)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, {"b": str(second_artifacts)}):
        for model in ("a", "b"):
            run = submit(redis.url, str(inputs), str(tmp_path / model), "Derain", "--wait", *STEPS, model=model)
            assert run.returncode == 0, run.stderr
            summary = json.loads(itsd(redis.url, "status", batch_id(run.stdout), "--json").stdout)
            assert list(summary["workers"]) == [f"w{'ab'.index(model)}@{os.uname().nodename}"]
    a, b = (np.asarray(Image.open(tmp_path / m / "set0" / "p000.png")) for m in "ab")
    assert not np.array_equal(a, b)  # different weights, different pictures


@pytest.mark.slow
def test_a_model_that_fails_its_warm_up_is_not_served_and_a_worker_left_with_none_exits(
    redis, tiny_artifacts, tmp_path
):
    broken = tmp_path / "broken-onnx"
    shutil.copytree(tiny_artifacts, broken)
    (broken / "unet.onnx").write_bytes(b"not an onnx graph")  # the folder checks pass; loading it fails
    client = redis_client(redis.url)
    roots = {"ITSD_INPUT_ROOTS": str(tmp_path), "ITSD_OUTPUT_ROOTS": str(tmp_path)}
    served = {"a": str(tiny_artifacts), "broken": str(broken)}
    both = LocalWorker(redis.url, served, "wb", tmp_path / "wb.log", 1, roots)
    alone = LocalWorker(redis.url, {"broken": str(broken)}, "wx", tmp_path / "wx.log")
    try:
        wait_registered(client, ["a"], [both.start()])
        assert alone.start().process.wait(timeout=120) == 1
        run = submit(redis.url, str(photos(tmp_path / "in", 1)), str(tmp_path / "out"), "Derain", "--wait", *STEPS)
        assert run.returncode == 0, run.stderr
        waiting = submit(redis.url, str(tmp_path / "in"), str(tmp_path / "out2"), "Derain", model="broken")
    finally:
        both.stop()
    assert "model broken failed its warm-up, so this worker does not serve it: " in both.log_tail(20000)
    assert "no model passed its warm-up: broken: " in alone.log_tail()
    assert not client.hexists(Keys.models, "broken")
    assert waiting.returncode == 0 and "1 queued" in waiting.stdout  # it waits for a worker that can run it
    assert client.llen("itsd.broken") == 1
    client.delete("itsd.broken")


@pytest.mark.slow
def test_a_batch_submitted_before_any_worker_is_done_once_when_one_comes_and_a_resubmit_recomputes_nothing(
    redis, tiny_artifacts, tmp_path
):
    from core.manifest import Manifest

    inputs, out = photos(tmp_path / "in", 4), tmp_path / "out"
    client = redis_client(redis.url)
    first = submit(redis.url, str(inputs), str(out), "Cartoonize it", *STEPS, model="late")  # no worker, ever
    assert first.returncode == 0 and "4 queued" in first.stdout, first.stderr
    bid = batch_id(first.stdout)
    assert client.llen("itsd.late") == 4 and "not pinned yet" in itsd(redis.url, "status", bid).stdout
    with workers(redis, tmp_path, {"late": str(tiny_artifacts)}):
        assert wait_done(client, bid, total=4)["done"] == 4
        again = submit(redis.url, str(inputs), str(out), "Cartoonize it", "--wait", *STEPS, model="late")
    assert again.returncode == 0 and "0 queued, 4 already done" in again.stdout and batch_id(again.stdout) == bid
    model_id = Manifest.read(tiny_artifacts).model_id
    summary = json.loads(itsd(redis.url, "status", bid, "--json").stdout)
    assert summary["batch"]["model_id"] == model_id and summary["counts"]["done"] == 4
    results = [json.loads(r) for r in client.hvals(Keys(bid).results)]
    assert len(results) == 4 and {(r["status"], r["model_id"], r["attempts"]) for r in results} == {
        ("done", model_id, 1)  # each job run once, by the model the batch is pinned to
    }
    assert len([p for p in out.rglob("*") if p.is_file()]) == 4


@pytest.mark.slow
def test_a_model_replaced_under_its_name_never_mixes_with_the_batch_the_old_one_made(
    redis, tiny_artifacts, second_artifacts, tmp_path
):
    from core.manifest import Manifest

    old, new = (Manifest.read(a).model_id for a in (tiny_artifacts, second_artifacts))
    inputs, out, client = (
        photo_folder(tmp_path / "in", 2, (64, 48), broken=True),
        tmp_path / "out",
        redis_client(redis.url),
    )

    def run(*options: str) -> subprocess.CompletedProcess:
        return submit(redis.url, str(inputs), str(out), "Cartoonize it", *options, *STEPS, model="swap")

    with workers(redis, tmp_path, {"swap": str(tiny_artifacts)}):
        made = run("--wait")  # broken.png fails; the batch is pinned to the old model
    assert made.returncode == 1 and "2 done" in made.stdout
    bid, before = batch_id(made.stdout), (out / "p0.png").read_bytes()
    waiting = run()  # while no worker runs, the registry still names the old model: the failed job is queued
    assert waiting.returncode == 0 and "1 queued, 2 already done" in waiting.stdout
    with workers(redis, tmp_path, {"swap": str(second_artifacts)}):  # the new model, under the same name
        wait_done(client, bid, total=3)
        failures = [r for r in map(json.loads, client.hvals(Keys(bid).results)) if r["status"] == "failed"]
        assert [f["error_type"] for f in failures] == ["model_mismatch"]
        assert f"batch pinned to model swap {old}; this worker serves {new}" in failures[0]["error_message"]
        refused = run()
        assert refused.returncode == 1 and f"was made with model swap {old}, and its workers now serve {new}" in (
            refused.stderr
        )
        redone = run("--overwrite", "--wait")
    assert redone.returncode == 1 and "2 done" in redone.stdout and "invalid_image" in redone.stderr
    done = [r for r in map(json.loads, client.hvals(Keys(bid).results)) if r["status"] == "done"]
    assert (
        len(done) == 2
        and {r["model_id"] for r in done} == {new}
        and client.hget(Keys(bid).batch, "model_id") == (new.encode())
    )
    assert (out / "p0.png").read_bytes() != before  # recomputed by the new model


@pytest.mark.slow
def test_jobs_whose_message_was_lost_or_stuck_with_no_holder_are_sent_again_by_the_waiting_producer(
    redis, tiny_artifacts, tmp_path
):
    from core.holds import UNACKED, UNACKED_INDEX
    from core.settings import Settings
    from producer.batch import Broker
    from producer.submit import wait_for

    inputs, client = photos(tmp_path / "in", 4), redis_client(redis.url)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):
        pass  # registers model a; no worker takes the jobs below until two are taken from the queue
    run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Derain", *STEPS)
    assert run.returncode == 0, run.stderr
    assert client.rpop("itsd.a") is not None  # taken as BRPOP takes it, never recorded: Redis "stopped"
    stuck = client.rpop("itsd.a")  # recorded as taken ten minutes ago by a worker that lost it in a Redis kill
    client.hset(UNACKED, "tag-stuck", json.dumps([json.loads(stuck), "itsd.a", "itsd.a"]))
    client.zadd(UNACKED_INDEX, {"tag-stuck": time.time() - 600})  # well within the hour's visibility timeout
    ttl = {"ITSD_CLAIM_TTL": "5"}  # a claim TTL of 5 s: the lost message is judged lost 5 s after it was sent
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env=ttl):
        broker = Broker(redis.url, Settings(claim_ttl=5))
        counts = wait_for(broker, batch_id(run.stdout), quiet=True, stalled_after=2, timeout=120)
    assert counts["done"] == 4 and len(list((tmp_path / "out").rglob("*.png"))) == 4
    assert client.hget(Keys(batch_id(run.stdout)).batch, "requeued") == b"1" and client.hlen(UNACKED) == 0


def start_slow_job(redis, inputs: Path, out: Path, steps: int) -> tuple[str, str, int]:
    """Submit one long job and wait until a pool child runs it: (batch id, job id, that child's pid)."""
    client = redis_client(redis.url)
    run = submit(
        redis.url, str(inputs), str(out), "Cartoonize", "--steps", str(steps), "--seed", "1", "--max-side", "256"
    )
    bid = batch_id(run.stdout)
    job_id = client.hkeys(Keys(bid).jobs)[0].decode()
    deadline = time.monotonic() + 60
    while (owner := client.get(Keys.claim(job_id))) is None:  # the claim names its owner: host:pid:nonce
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.02)
    return bid, job_id, int(owner.decode().split(":")[-2])


def wait_done(client, bid: str, timeout: float = 180, total: int = 0) -> dict[str, int]:
    """The batch's counts once a job is done, or with `total`, once that many jobs are final."""
    deadline = time.monotonic() + timeout
    while (counts := status_counts(client, Keys(bid)))["done"] < 1 or sum(counts.values()) < total:
        assert time.monotonic() < deadline, counts
        time.sleep(0.5)
    return counts


@pytest.mark.slow
def test_a_pool_child_killed_mid_job_still_ends_with_exactly_one_output(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 1, size=(256, 256))
    client = redis_client(redis.url)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, concurrency=2):
        bid, job_id, child = start_slow_job(redis, inputs, tmp_path / "out", steps=400)
        os.kill(child, signal.SIGKILL)
        assert wait_done(client, bid) == {"done": 1, "skipped": 0, "failed": 0, "cancelled": 0}
    assert int(client.hget(Keys(bid).attempts, job_id)) == 2  # delivered again after the kill
    files = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["p000.png"]  # one output, no half-written temporary left behind


@pytest.mark.slow
def test_a_worker_killed_with_its_process_group_hands_its_job_back_without_the_visibility_timeout(
    redis, tiny_artifacts, tmp_path
):
    inputs = photos(tmp_path / "in", 1, size=(256, 256))
    client = redis_client(redis.url)
    spec = {"a": str(tiny_artifacts)}
    with workers(redis, tmp_path, spec, spec) as fleet:  # default settings: an hour's visibility timeout
        bid, job_id, child = start_slow_job(redis, inputs, tmp_path / "out", steps=300)
        parent = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        (running,) = [w for w in fleet if w.process.pid == parent]
        (survivor,) = [w for w in fleet if w is not running]
        running.kill()  # SIGKILL to the worker and its pool child, as the OOM killer does: nothing acknowledges
        assert wait_done(client, bid)["done"] == 1  # the survivor's heartbeat hands the job back
    assert json.loads(client.hget(Keys(bid).results, job_id))["worker"] != f"{running.name}@{os.uname().nodename}"
    assert int(client.hget(Keys(bid).attempts, job_id)) == 2  # the killed delivery, then the one that finished
    assert "handed back 1 job(s) that a dead worker held" in survivor.log_tail(20000)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["p000.png"]


@pytest.mark.slow
def test_batched_jobs_match_itsd_edit_share_unet_calls_and_a_corrupt_one_fails_alone(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 6, size=(128, 96))  # 6 tiles each: a long enough UNet phase to overlap
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    options = ["--steps", "12", "--seed", "3"]
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env={"ITSD_BATCH_JOBS": "3"}):
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Derain", "--wait", *options)
    results = [json.loads(r) for r in redis_client(redis.url).hvals(Keys(batch_id(run.stdout)).results)]
    assert run.returncode == 1 and "6 done" in run.stdout and "1 failed" in run.stdout, run.stdout + run.stderr
    assert "broken.png" in run.stderr and "invalid_image" in run.stderr
    edit = ["edit", str(inputs), "-m", str(tiny_artifacts), "-i", "Derain", "-o", str(tmp_path / "ref"), "-q"]
    CliRunner().invoke(itsd_group, [*edit, *options])
    for output in sorted((tmp_path / "out").rglob("*.png")):
        reference = np.asarray(Image.open(tmp_path / "ref" / output.relative_to(tmp_path / "out")))
        assert psnr(np.asarray(Image.open(output)), reference) >= 60, output
    shared = [r["batched_jobs"] for r in results if r["status"] == "done"]
    assert max(shared) >= 2, shared  # jobs did run their UNet calls together


@pytest.mark.slow
def test_a_batching_worker_killed_mid_batch_loses_nothing_and_computes_nothing_twice(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 3, size=(256, 256))
    client = redis_client(redis.url)
    env = {"ITSD_VISIBILITY_TIMEOUT": "6", "ITSD_BATCH_JOBS": "3"}
    spec = {"a": str(tiny_artifacts)}
    with workers(redis, tmp_path, spec, env=env) as (batching,):
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize", "--steps", "300", "--seed", "1")
        bid = batch_id(run.stdout)
        deadline = time.monotonic() + 60
        while sum(client.exists(Keys.claim(job.decode())) for job in client.hkeys(Keys(bid).jobs)) < 3:
            assert time.monotonic() < deadline, "the three jobs never ran together"
            time.sleep(0.05)
        batching.kill()
        with workers(redis, tmp_path, spec, env=env):
            deadline = time.monotonic() + 180
            while (counts := status_counts(client, Keys(bid)))["done"] < 3:
                assert time.monotonic() < deadline, counts
                time.sleep(0.5)
    assert counts == {"done": 3, "skipped": 0, "failed": 0, "cancelled": 0}
    assert all(int(n) >= 2 for n in client.hvals(Keys(bid).attempts))  # delivered again after the kill
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["p000.png", "p001.png", "p002.png"]


@pytest.mark.slow
@pytest.mark.parametrize("batch_jobs", ["1", "2"], ids=["prefork", "threads"])
def test_sigquit_hands_a_running_job_back_after_the_soft_shutdown_timeout(redis, tiny_artifacts, tmp_path, batch_jobs):
    inputs = photos(tmp_path / "in", 1, size=(256, 256))
    client = redis_client(redis.url)
    env = {"ITSD_INPUT_ROOTS": str(tmp_path), "ITSD_OUTPUT_ROOTS": str(tmp_path), "ITSD_BATCH_JOBS": batch_jobs}
    command = [*ITSD, "worker", "-m", f"a={tiny_artifacts}", "--soft-shutdown-timeout", "1"]
    stopping = LocalWorker(redis.url, {}, "soft", tmp_path / "soft.log", extra_env=env, command=command).start()
    try:
        wait_registered(client, ["a"], [stopping])
        bid, job_id, _ = start_slow_job(redis, inputs, tmp_path / "out", steps=300)
        assert stopping.process is not None
        stopping.process.send_signal(signal.SIGQUIT)
        assert stopping.process.wait(timeout=30) is not None  # gone soon after the 1 s it was given
    finally:
        stopping.kill()
    assert status_counts(client, Keys(bid))["done"] == 0 and not client.hexists(Keys(bid).results, job_id)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):  # the job was handed back, not lost
        assert wait_done(client, bid)["done"] == 1
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["p000.png"]


@pytest.mark.slow  # a real fleet: in CI's full run, kept out of the inner loop
def test_a_pickle_message_is_refused_dead_lettered_with_its_reason_and_the_worker_goes_on(
    redis, tiny_artifacts, tmp_path
):
    from celery import Celery

    inputs = photos(tmp_path / "in", 1)
    client = redis_client(redis.url)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}) as (worker,):
        sender = Celery(broker=redis.url)
        sender.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
        sender.send_task(TASK_NAME, args=[{"job_id": "pickled"}], queue="itsd.a", serializer="pickle", task_id="p1")
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize", "--wait", *STEPS)
        assert run.returncode == 0 and "1 done" in run.stdout
        assert worker.alive()
    assert "untrusted content of type pickle" in worker.log_path.read_text()
    (dead,) = [d for d in (json.loads(e) for e in client.lrange(Keys.dead, 0, -1)) if d["job"].get("task_id") == "p1"]
    assert dead["error_type"] == "schema" and dead["job"]["content_type"] == "application/x-python-serialize"
    assert "message refused: Refusing to deserialize untrusted content of type pickle" in dead["error_message"]
    assert dead["job"]["task"] == TASK_NAME and dead["worker"].startswith("w0@")
    assert client.llen("itsd.a") == 0  # refused, not left to be delivered again


def test_queue_entries_that_are_no_message_are_dead_lettered_and_the_worker_goes_on(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 1)
    client = redis_client(redis.url)
    bad = ["not json", "[1, 2]", '{"a": 1}', '"text"', "5"]
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}) as (worker,):
        for entry in bad:
            client.lpush("itsd.a", entry)
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize", "--wait", *STEPS)
        assert run.returncode == 0 and "1 done" in run.stdout, run.stderr
        assert worker.alive()
    dead = [json.loads(e) for e in client.lrange(Keys.dead, 0, -1)]
    refused = [d for d in dead if d["error_message"].startswith("queue entry is not a message")]
    assert len(refused) == len(bad) and any(d["job"]["raw"] == "not json" for d in refused)
    assert client.llen("itsd.a") == 0


@pytest.mark.slow  # a real fleet: in CI's full run, kept out of the inner loop
def test_cancel_keeps_queued_jobs_from_running(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 5)
    run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize", *STEPS)  # and no worker runs yet
    bid = batch_id(run.stdout)
    cancelled = itsd(redis.url, "cancel", bid)
    assert cancelled.returncode == 0 and "5 unfinished" in cancelled.stdout
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):
        client = redis_client(redis.url)
        deadline = time.monotonic() + 60
        while status_counts(client, Keys(bid))["cancelled"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a real fleet: in CI's full run, kept out of the inner loop
def test_inline_jobs_come_back_through_collect(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 3)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):
        run = submit(redis.url, str(inputs), str(tmp_path / "out"), "Cartoonize", "--inline", "--wait", *STEPS)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3  # --wait collects
    again = itsd(redis.url, "collect", batch_id(run.stdout), "--out", str(tmp_path / "copy"))
    assert "collected 3" in again.stdout and (tmp_path / "copy" / "set1" / "p001.png").is_file()


def test_a_manifest_gives_each_row_its_instruction_and_a_bad_row_fails_alone(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 2)
    manifest = tmp_path / "jobs.jsonl"
    rows = [
        {"input": "in/set0/p000.png", "instruction": "Derain", "steps": 1},
        {"input": "in/set1/p001.png", "output": "renamed.png", "seed": 3},
        {"input": "in/set1/p001.png", "output": "other.png", "steps": "many"},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert inputs.is_dir()
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}):
        run = submit(redis.url, str(manifest), str(tmp_path / "out"), "Cartoonize", "--wait", *STEPS)
    assert run.returncode == 1 and "2 done" in run.stdout and "1 refused" in run.stdout
    assert "jobs.jsonl:3" in run.stderr and "steps" in run.stderr
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.png")) == ["p000.png", "renamed.png"]


@pytest.mark.slow
@pytest.mark.parametrize("max_retries", [1, 4])  # 4: past Celery's own default limit of 3, one limit holds end to end
def test_a_full_disk_is_retried_then_recorded_failed_and_dead_lettered(
    redis, tiny_artifacts, tmp_path, tmpfs, max_retries
):
    inputs = photos(tmp_path / "in", 1)
    disk = tmpfs("out", 2**16)
    (disk / "filler").write_bytes(b"x" * 2**16)
    env = {"ITSD_MAX_RETRIES": str(max_retries)}
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env=env):
        run = submit(redis.url, str(inputs), str(disk), "Cartoonize", "--wait", *STEPS)
    assert run.returncode == 1 and "storage: " in run.stderr and "No space left" in run.stderr
    assert f"failed {inputs / 'set0' / 'p000.png'}: storage" in run.stderr  # the line names the input
    dead = [json.loads(e) for e in redis_client(redis.url).lrange(Keys.dead, 0, -1)]
    entry = next(e for e in dead if e["job"]["input_uri"].startswith(str(tmp_path)))
    assert entry["attempts"] == max_retries + 1 and entry["error_type"] == "storage"


@pytest.mark.slow
def test_a_redis_restart_mid_batch_loses_no_result_and_the_batch_completes(redis, tiny_artifacts, tmp_path):
    inputs = photos(tmp_path / "in", 30, size=(128, 128))
    client = redis_client(redis.url)
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}) as fleet:
        run = submit(
            redis.url,
            str(inputs),
            str(tmp_path / "out"),
            "Cartoonize",
            "--steps",
            "20",
            "--seed",
            "2",
            "--max-side",
            "128",
        )
        bid = batch_id(run.stdout)
        while status_counts(client, Keys(bid))["done"] < 5:
            time.sleep(0.1)
        before = {k: v for k, v in client.hgetall(Keys(bid).results).items()}
        redis.restart()
        waited = itsd(redis.url, "status", bid, "--json")
        deadline = time.monotonic() + 240
        while json.loads(waited.stdout)["counts"]["done"] < 30:
            # on a stall, the worker's log says whether it lost a message or stopped consuming after reconnecting
            assert time.monotonic() < deadline, waited.stdout + fleet[0].log_tail(6000)
            time.sleep(1)
            waited = itsd(redis.url, "status", bid, "--json")
    after = client.hgetall(Keys(bid).results)
    assert all(after[k] == v for k, v in before.items())  # nothing finished before the restart was lost
    assert len(list((tmp_path / "out").rglob("*.png"))) == 30


@pytest.mark.slow
def test_itsd_run_follows_the_symlink_rule_and_reads_a_file_uri_row_as_a_local_path(tiny_artifacts, tmp_path):
    inputs, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    for folder in (inputs / "x", inputs / "y", inputs / ".store", elsewhere):
        folder.mkdir(parents=True)
    photo(64, 48, seed=0).save(inputs / "x" / "a.png")
    photo(64, 48, seed=1).save(inputs / ".store" / "b.png")
    photo(64, 48, seed=2).save(elsewhere / "c.png")
    (inputs / "y" / "b.png").symlink_to(inputs / ".store" / "b.png")  # within the folder given: followed
    (inputs / "y" / "out.png").symlink_to(elsewhere / "c.png")  # out of it: refused, as `itsd edit` refuses it
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"input": f"file://{elsewhere}/c.png"}) + "\n")  # no output column
    out, model = tmp_path / "out", ["-m", str(tiny_artifacts)]
    run = subprocess.run(
        [*ITSD, "run", str(inputs), str(manifest), "-i", "Cartoonize", *model, "-o", str(out), *STEPS],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1 and "3 done, 0 skipped (already there), 1 failed of 4" in run.stdout, run.stderr
    assert (
        f"outside_roots: {inputs / 'y' / 'out.png'}: a symlink to {elsewhere / 'c.png'}, outside {inputs}" in run.stderr
    )
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted(["x/a.png", "y/b.png", str(elsewhere / "c.png").lstrip("/")])


@pytest.mark.slow
def test_itsd_run_leaves_no_process_behind_even_when_interrupted(tiny_artifacts, tmp_path):
    model = ["-m", str(tiny_artifacts)]
    done = subprocess.Popen(
        [
            *ITSD,
            "run",
            str(photos(tmp_path / "in", 3)),
            "-i",
            "Cartoonize",
            *model,
            "-o",
            str(tmp_path / "out"),
            "--workers",
            "2",
            *STEPS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = set()
    while done.poll() is None:
        seen |= descendants(done.pid)
        time.sleep(0.05)
    assert done.returncode == 0, done.stderr.read()
    assert len(seen) >= 5  # redis, two workers, their pool children
    summary = json.loads((tmp_path / "out" / "itsd-run.json").read_text())
    assert summary["counts"]["done"] == 3 and (tmp_path / "out" / "itsd-contact-sheet.jpg").is_file()
    assert (summary["params"]["steps"], summary["params"]["guidance_scale"]) == (2, 7.0)  # as run: resolved
    assert summary["runtimes"] == ["onnxruntime CPUExecutionProvider"]  # what the workers chose (conftest's pin)
    assert still_running(seen) == []

    big = photos(tmp_path / "big", 3, size=(512, 512))  # 1000 steps at 512 px: long enough to interrupt
    slow = subprocess.Popen(
        [*ITSD, "run", str(big), "-i", "Derain", *model, "-o", str(tmp_path / "out2"), "--steps", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal: a suite started in the background (`cmd &`) hands its children SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while len(seen := descendants(slow.pid)) < 3:  # redis, worker, pool child
        assert time.monotonic() < deadline and slow.poll() is None
        time.sleep(0.1)
    time.sleep(3)  # a job is running
    seen |= descendants(slow.pid)
    slow.send_signal(signal.SIGINT)
    assert slow.wait(60) == 130
    assert "interrupted" in slow.stderr.read()
    assert still_running(seen) == []


@pytest.mark.slow
def test_itsd_run_names_a_worker_that_died_starts_another_and_finishes_the_batch(tiny_artifacts, tmp_path):
    inputs, out = photos(tmp_path / "in", 12, size=(128, 128)), tmp_path / "out"
    command = [*ITSD, "run", str(inputs), "-i", "Cartoonize", "-m", str(tiny_artifacts), "-o", str(out), "-q"]
    run = subprocess.Popen(
        [*command, "--workers", "2", "--steps", "20", "--seed", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while len(list(out.rglob("p*.png"))) < 2:  # both workers are busy by now
        assert time.monotonic() < deadline and run.poll() is None, run.stderr.read() if run.poll() else ""
        time.sleep(0.1)
    children = [p for p, _ in descendants(run.pid) if _stat(str(p)) and _stat(str(p))[0] == run.pid]
    (worker,) = [p for p in children if b"local0@" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.killpg(worker, signal.SIGKILL)  # the worker and its pool child, mid-job: the OOM killer's way
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    (line,) = [line for line in err.splitlines() if "died" in line]
    assert line.startswith("worker local0 died (killed by SIGKILL; log ") and "started another" in line, err
    Path(line.split("; log ")[1].split(")")[0]).unlink()  # the dead worker's log, kept for whoever reads the line
    summary = json.loads((out / "itsd-run.json").read_text())
    assert summary["counts"]["done"] == 12 and len(list(out.rglob("p*.png"))) == 12


def _stat(pid: str) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], fields[19]


def descendants(root: int) -> set[tuple[int, str]]:
    """Every live process below ROOT, as (pid, start time) so a reused pid is not mistaken for it."""
    stats = {int(p.name): _stat(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found, frontier = set(), [root]
    while frontier:
        parent = frontier.pop()
        for pid, stat in stats.items():
            if stat and stat[0] == parent and stat[1] != "Z":
                found.add((pid, stat[2]))
                frontier.append(pid)
    return found


def still_running(processes: set[tuple[int, str]]) -> list[int]:
    alive = []
    for pid, start in processes:
        stat = _stat(str(pid))
        if stat and stat[2] == start and stat[1] != "Z":
            alive.append(pid)
    return alive


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a localhost certificate it signed, made with the openssl command."""
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for command in (
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=itsd-test-ca -keyout ca.key -out ca.pem",
        "req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr",
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile san.cnf -out server.pem",
    ):
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True, cwd=folder)
    return folder / "server.pem", folder / "server.key", folder / "ca.pem"


@pytest.mark.slow  # a real fleet: in CI's full run, kept out of the inner loop
def test_the_fleet_works_over_tls_with_checked_certificates(tiny_artifacts, tmp_path):
    tls = certificates(tmp_path)
    inputs = photos(tmp_path / "in", 2)
    with RedisServer(tls=tls) as secure, workers(secure, tmp_path, {"a": str(tiny_artifacts)}):
        assert secure.url.startswith("rediss://") and "ssl_cert_reqs=required" in secure.url
        run = submit(secure.url, str(inputs), str(tmp_path / "out"), "Cartoonize", "--wait", *STEPS)
    assert run.returncode == 0 and "2 done" in run.stdout, run.stderr


@pytest.mark.slow
def test_the_demo_runs_the_bundled_model_exported_once_and_cached(tmp_path):
    from training.recipes.demo import write_demo_inputs

    manifest = write_demo_inputs(tmp_path / "inputs", side=64)
    env = {**os.environ, "ITSD_CACHE_DIR": str(tmp_path / "cache")}
    logs = []
    for attempt in ("first", "second"):  # no --model: the bundled itsd-tiny checkpoint
        run = subprocess.run(
            [*ITSD, "run", str(manifest), "--out", str(tmp_path / attempt), "--steps", "1", "--seed", "0"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0 and "15 done" in run.stdout, run.stderr
        logs.append(run.stderr)
    assert "exporting" in logs[0] and "using the cached export" in logs[1] and "exporting" not in logs[1]
    (export,) = (tmp_path / "cache" / "exports").iterdir()
    assert json.loads((export / "manifest.json").read_text())["parity"]["psnr_db"] > 40
    images = json.loads((tmp_path / "second" / "itsd-run.json").read_text())["images"]
    assert len(images) == 15 and all(i["working_size"] == i["size"] == [64, 64] and i["tiles"] == 1 for i in images)


def test_submit_wait_says_within_seconds_that_redis_is_down_and_carries_on_when_it_is_back(tmp_path, capsys):
    from core.job import Result
    from core.records import record_result
    from core.settings import Settings
    from producer.batch import Broker
    from producer.submit import wait_for

    with RedisServer(tmp_path, appendonly=True) as server:
        broker, keys = Broker(server.url, Settings()), Keys("b1")
        broker.client.hset(keys.batch, mapping={"total": 1})
        counts: dict[str, int] = {}
        waiting = threading.Thread(target=lambda: counts.update(wait_for(broker, "b1", quiet=True, poll=0.2)))
        waiting.start()
        time.sleep(0.5)
        server.stop()  # down for two seconds (records' retries would hide it for a minute), then back with its data
        time.sleep(2.0)
        server.start()
        record_result(redis_client(server.url), keys, Result("j1", "done").to_dict(), 60)
        waiting.join(timeout=60)
    assert not waiting.is_alive() and counts["done"] == 1
    err = capsys.readouterr().err
    assert err.count("is unreachable; waiting for it") == 1 and "Redis is back" in err
    assert server.password not in err


@pytest.mark.parametrize("fault", ["wrong password", "no password", "closed port"])
def test_a_broker_that_cannot_be_used_is_one_line_within_seconds_never_the_password(redis, tiny_artifacts, fault):
    from producer.local import free_port

    url = {
        "wrong password": redis.url.replace(redis.password, "not-the-password"),
        "no password": redis.url.replace(f":{redis.password}@", ""),
        "closed port": f"redis://:secret-pw@127.0.0.1:{free_port()}/0",
    }[fault]
    expected = {"wrong password": "refused the password", "no password": "needs a password"}.get(
        fault, "cannot connect"
    )
    commands = [["status", "0123456789abcdef"]]
    if (
        fault != "closed port"
    ):  # a worker waits for a Redis that is not up yet (it may start first), but not for a password
        commands.append(["worker", "--model", f"a={tiny_artifacts}"])
    for command in commands:
        start = time.monotonic()
        run = itsd(url, *command, timeout=60)
        assert run.returncode != 0 and time.monotonic() - start < 15, (command, run.stderr)
        assert expected in run.stderr.strip().splitlines()[-1], run.stderr
        assert not {"not-the-password", "secret-pw", redis.password} & set(run.stderr.split()), run.stderr
