"""Object storage for real: inputs and outputs on s3:// (s3fs) against moto's S3 server on a loopback port,
with real workers. Versioning is on, so "written once" is counted: one version per output key is one put."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3  # with moto[server], in itsd[dev]
import pytest
from conftest import photo
from fleet import submit, workers

from core.access import Access
from core.params import EditParams
from core.records import Keys, status_counts
from core.redis_url import redis_client
from producer.local import RedisServer, free_port
from producer.sources import collect_sources

SECRET = "moto-secret-key-never-logged"
STEPS = ["--steps", "2", "--seed", "5"]


@contextmanager
def moto(log: Path, **env: str) -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port (its settings in `env`); its endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:  # moto's own API: no S3 action, so it does not count against INITIAL_NO_AUTH_ACTION_COUNT
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(10)


@contextmanager
def environment(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`env` in os.environ (the CLI subprocesses inherit it), restored after."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def aws(endpoint: str, key: str = "itsd-test", secret: str = SECRET) -> dict[str, str]:
    """Credentials and endpoint from the environment only, as a worker gets them."""
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    """moto's S3 server, and the environment that points boto and s3fs at it."""
    with moto(tmp_path_factory.mktemp("moto") / "moto.log") as url, environment(aws(url)) as env:
        yield env


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def bucket(name: str, images: int, folder: Path) -> None:
    """A versioned bucket with `images` photos under photos/ (in two sub-folders), mirrored in `folder`."""
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    for i in range(images):
        relative = f"set{i % 2}/p{i}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        photo(64, 48, seed=i).save(folder / relative)
        client.upload_file(str(folder / relative), name, f"photos/{relative}")


def versions(name: str, prefix: str) -> dict[str, int]:
    listed = boto3.client("s3").list_object_versions(Bucket=name, Prefix=prefix).get("Versions", [])
    counts: dict[str, int] = {}
    for version in listed:
        counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def reset_s3fs() -> None:
    """s3fs caches filesystems and listings per process; a test that changes a bucket behind it starts fresh."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_an_s3_prefix_lists_like_a_local_folder(s3, tmp_path):
    bucket("listing", 5, tmp_path / "local")
    reset_s3fs()
    remote, rejected = collect_sources(["s3://listing/photos/"], "Derain", EditParams(), Access(schemes=("file", "s3")))
    local, _ = collect_sources([str(tmp_path / "local")], "Derain", EditParams(), Access())
    assert not rejected and len(remote) == 5
    assert sorted(s.relative for s in remote) == sorted(s.relative for s in local)  # the same output keys
    assert all(s.uri.startswith("s3://listing/photos/set") for s in remote)


@pytest.mark.slow
def test_submit_from_s3_to_s3_writes_each_output_once_and_logs_no_credential(s3, redis, tiny_artifacts, tmp_path):
    bucket("roundtrip", 6, tmp_path / "local")
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, concurrency=2, env=s3) as fleet:
        run = submit(redis.url, "s3://roundtrip/photos/", "s3://roundtrip/edited/", "Derain", "--wait", *STEPS)
        again = submit(redis.url, "s3://roundtrip/photos/", "s3://roundtrip/edited/", "Derain", "--wait", *STEPS)
        logs = "".join(w.log_path.read_text() for w in fleet)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 done" in run.stdout and "0 queued, 6 already done" in again.stdout
    assert versions("roundtrip", "edited/") == {f"edited/set{i % 2}/p{i}.png": 1 for i in range(6)}
    assert SECRET not in logs + run.stdout + run.stderr


@pytest.mark.slow
def test_a_missing_bucket_fails_each_job_with_one_line(s3, redis, tiny_artifacts, tmp_path):
    bucket("inputs-only", 2, tmp_path / "local")
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env=s3):
        run = submit(redis.url, "s3://inputs-only/photos/", "s3://no-such-bucket/out/", "Derain", "--wait", *STEPS)
    assert run.returncode == 1 and "2 failed" in run.stdout, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if "storage_refused" in line]
    assert len(lines) == 2 and all("s3://no-such-bucket/out/" in line for line in lines), run.stderr


@pytest.mark.slow
def test_an_s3_batch_resumes_after_its_worker_is_killed_and_writes_once(s3, redis, tiny_artifacts, tmp_path):
    bucket("resume", 3, tmp_path / "local")
    client = redis_client(redis.url)
    env = {**s3, "ITSD_VISIBILITY_TIMEOUT": "6"}
    options = ["--steps", "150", "--seed", "1"]
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env=env) as (first,):
        run = submit(redis.url, "s3://resume/photos/", "s3://resume/edited/", "Derain", *options)
        bid = run.stdout.split("batch ", 1)[1].split(":", 1)[0]
        deadline = time.monotonic() + 60
        while not list(client.scan_iter(match=Keys.claim("*"))):
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.05)
        first.kill()
    with workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env=env):
        deadline = time.monotonic() + 240
        while (counts := status_counts(client, Keys(bid)))["done"] < 3:
            assert time.monotonic() < deadline, counts
            time.sleep(0.5)
    assert versions("resume", "edited/") == {f"edited/set{i % 2}/p{i}.png": 1 for i in range(3)}


@pytest.mark.slow
def test_a_denied_write_fails_each_job_with_one_line(s3, redis, tiny_artifacts, tmp_path):
    """moto with IAM on: after the setup's first 6 requests, every request is checked against its user's policy.
    The workers and the producer get a user that may read and list, not write."""
    with moto(tmp_path / "iam.log", INITIAL_NO_AUTH_ACTION_COUNT="6") as url:
        admin = {"endpoint_url": url, "region_name": "us-east-1"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        read_only = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [read_only]})
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=policy)
        client = boto3.client("s3", **admin)
        client.create_bucket(Bucket="guarded")
        for i in range(2):
            photo(64, 48, seed=i).save(tmp_path / f"p{i}.png")
            client.upload_file(str(tmp_path / f"p{i}.png"), "guarded", f"photos/p{i}.png")
        reader = aws(url, key["AccessKeyId"], key["SecretAccessKey"])
        with environment(reader), workers(redis, tmp_path, {"a": str(tiny_artifacts)}, env=reader):
            run = submit(redis.url, "s3://guarded/photos/", "s3://guarded/edited/", "Derain", "--wait", *STEPS)
    assert run.returncode == 1 and "2 failed" in run.stdout, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if "storage_refused" in line]
    assert len(lines) == 2 and all("s3://guarded/edited/p" in line for line in lines), run.stderr
    assert key["SecretAccessKey"] not in run.stdout + run.stderr
