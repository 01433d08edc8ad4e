"""compose.yaml and compose.cpu.yaml, checked by Debian's docker-compose (`config` validates against the Compose
schema and resolves variables without a Docker engine), and the worker image's promises. The CPU fleet really
runs in tests/test_containers.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def compose_config(file: str = "compose.yaml", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker-compose", "-f", str(REPO / file), "config"],
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


def test_the_cpu_compose_file_runs_every_service_from_images_built_here_without_a_gpu():
    run = compose_config("compose.cpu.yaml", REDIS_PASSWORD="s3cret", FLOWER_PASSWORD="fl0wer", ITSD_UID="1234")
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert set(services) == {"redis", "worker", "flower", "metrics", "producer"}
    gpu = yaml.safe_load(compose_config(REDIS_PASSWORD="s3cret", FLOWER_PASSWORD="fl0wer").stdout)["services"]
    assert services["redis"] == gpu["redis"]  # the same Redis: password, append-only, no eviction, its volume
    worker = services["worker"]
    assert "deploy" not in worker and worker["command"][-2:] == ["--device", "cpu"]
    assert worker["build"]["args"] == {
        "BASE": "python:3.11-slim-bookworm",
        "EXTRAS": "worker,openvino,s3",
        "PACKAGES": "flower",
    }
    for name in ("worker", "flower", "metrics", "producer"):
        assert services[name]["image"] == "itsd-worker-cpu:latest" and services[name]["user"] == "1234:1000"
    assert (
        services["flower"]["entrypoint"] == ["celery"]
        and services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "itsd:fl0wer"
    )
    assert worker["environment"]["ITSD_BROKER_URL"] == "redis://:s3cret@redis:6379/0"
    assert "container_name" not in worker and "ports" not in worker  # so `--scale worker=N` works


def test_scripts_images_builds_the_cpu_image_compose_cpu_yaml_builds():
    script = (REPO / "scripts" / "images").read_text()
    worker = yaml.safe_load((REPO / "compose.cpu.yaml").read_text())["services"]["worker"]
    (cpu,) = [line for line in script.splitlines() if line.strip().startswith("cpu) flavour=")]
    assert f"-t {worker['image']}" in cpu and worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert all(f"--build-arg {k}={v}" in cpu for k, v in worker["build"]["args"].items() if k != "BASE")


def test_the_worker_image_defaults_to_cuda_and_the_gpu_extra_installs_no_torch_and_runs_as_uid_1000():
    dockerfile = (REPO / "docker" / "worker.Dockerfile").read_text()
    assert "ARG BASE=nvidia/cuda:" in dockerfile and "ARG EXTRAS=gpu,s3" in dockerfile
    install = dockerfile[dockerfile.index('RUN python3 -m venv "$VIRTUAL_ENV"') :]
    assert '".[$EXTRAS]"' in install and 'pip" check' in install and '! "$VIRTUAL_ENV/bin/pip" show torch' in install
    assert "${NO_INDEX:+--no-index}" in install  # offline: the wheelhouse only
    assert 'ENTRYPOINT ["itsd"]' in dockerfile and "\nUSER 1000\n" in dockerfile
