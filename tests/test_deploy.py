"""compose.yaml, checked by Debian's docker-compose (`config` validates against the Compose schema and
resolves variables without a Docker engine), and the worker image's promises."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def compose_config(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker-compose", "-f", str(REPO / "compose.yaml"), "config"],
        env={k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "ITSD_"))} | env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_compose_file_is_valid_and_configures_the_fleet():
    run = compose_config(REDIS_PASSWORD="s3cret", FLOWER_PASSWORD="fl0wer", ITSD_MODEL="derain")
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert set(services) == {"redis", "worker", "flower", "metrics", "producer"}
    assert services["metrics"]["command"][0] == "metrics" and services["worker"]["healthcheck"]["test"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert "--requirepass" in redis_command and services["redis"]["volumes"]
    worker = services["worker"]
    assert worker["environment"]["ITSD_BROKER_URL"] == "redis://:s3cret@redis:6379/0"
    assert worker["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
    assert worker["command"][:3] == ["worker", "--model", "derain=/models/derain"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "container_name" not in worker and "ports" not in worker  # so `--scale worker=N` works
    assert services["flower"]["environment"]["CELERY_BROKER_URL"].startswith("redis://:s3cret@")
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "itsd:fl0wer"  # its own, not Redis's
    assert all("s3cret" not in part and "fl0wer" not in part for part in services["flower"]["command"])
    assert worker["environment"]["ITSD_INPUT_ROOTS"] == worker["environment"]["ITSD_OUTPUT_ROOTS"] == "/data"
    assert services["producer"]["profiles"] == ["tools"]


def test_compose_refuses_to_start_without_a_redis_password_or_a_flower_password():
    run = compose_config()
    assert run.returncode != 0 and "set REDIS_PASSWORD" in run.stderr
    run = compose_config(REDIS_PASSWORD="s3cret")
    assert run.returncode != 0 and "set FLOWER_PASSWORD" in run.stderr


def test_the_worker_image_installs_the_gpu_extra_and_no_torch():
    dockerfile = (REPO / "docker" / "worker.Dockerfile").read_text()
    install = next(line for line in dockerfile.splitlines() if line.startswith("RUN pip install"))
    assert '".[gpu,s3]"' in install and "! pip show torch" in install
    assert 'ENTRYPOINT ["itsd"]' in dockerfile
