"""The fleet as users deploy it: images built without a registry (scripts/images: a Debian base from Debian's
packages, wheels made on the host), compose.cpu.yaml up with three workers, the producer in a container, a
worker killed and Redis restarted mid-batch, and `compose down -v` leaving nothing behind. Needs a Docker
engine: one is started (as root) when none runs; a machine with none fails here, saying why, never skips."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from containers import CpuFleet, build_images, checked, docker_engine, image_size, run
from fleet import photo_folder

from core.records import Keys


@pytest.fixture(scope="module")
def engine():
    try:
        with docker_engine():
            yield
    except RuntimeError as reason:
        pytest.fail(f"no Docker engine: {reason}", pytrace=False)


@pytest.fixture(scope="module")
def cpu_image(engine):
    seconds = build_images("cpu")
    print(f"\nitsd-worker-cpu: built in {seconds} s, {image_size('itsd-worker-cpu:latest') / 1e6:.0f} MB")
    return "itsd-worker-cpu:latest"


def outputs(folder):
    return sorted(folder.rglob("*.png")) if folder.is_dir() else []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_three_container_workers_finish_a_batch_exactly_once_through_a_killed_worker_and_a_redis_restart(
    cpu_image, tmp_path
):
    fleet = CpuFleet(tmp_path, f"itsd-e2e-{os.getpid()}")
    photo_folder(fleet.data / "in", 30, size=(128, 128))
    out = fleet.data / "out"
    try:
        up = time.monotonic()
        fleet.compose("up", "-d", "--scale", "worker=3")
        producer = fleet.producer(
            "submit", "/data/in", "-i", "Cartoonize the image", "-m", "tiny", "-o", "/data/out",
            "--steps", "20", "--seed", "3", "--wait", "-q",
        )  # fmt: skip
        while not outputs(out):  # submitted before any worker is warm: the batch waits for them
            assert producer.poll() is None, producer.stdout.read().decode()
            time.sleep(0.2)
        print(f"\nfrom `up` to the first job done: {time.monotonic() - up:.1f} s")
        while len(outputs(out)) < 8:
            time.sleep(0.1)
        checked("docker", "kill", fleet.containers("worker")[0])
        checked("docker", "restart", fleet.containers("redis")[0], timeout=120)  # the queue from its AOF
        log, _ = producer.communicate(timeout=900)
        log = log.decode()
        assert producer.returncode == 0, log
        batch = log.split("batch ", 1)[1].split(":", 1)[0]
        status = fleet.status(batch)
        assert status["counts"] == {"done": 30, "skipped": 0, "failed": 0, "cancelled": 0}, status
        recorded = fleet.redis("HVALS", Keys(batch).by_worker)  # jobs each worker recorded done
        assert sum(map(int, recorded.split())) == 30, recorded  # each job once, none computed twice
        results = [json.loads(line) for line in fleet.redis("HVALS", Keys(batch).results).splitlines()]
        assert {r["runtime"].split()[0] for r in results} == {"openvino"}  # the CPU image's runtime
        files = outputs(out)
        assert sorted(f.name for f in files) == sorted(f"p{i}.png" for i in range(30))
        for f in files:  # the host's user owns the outputs and can read them
            info = f.stat()
            assert info.st_uid == fleet.uid and info.st_mode & stat.S_IRUSR and os.access(f, os.R_OK)
        code, metrics = fleet.get(fleet.metrics_port, "/metrics")
        assert code == 200 and 'model="tiny"' in metrics
        assert fleet.get(fleet.flower_port, "/workers")[0] == 401  # Flower asks for its password
        assert fleet.get(fleet.flower_port, "/workers", fleet.flower_password)[0] == 200
    finally:
        fleet.down()
    assert fleet.left_behind() == {"container": [], "volume": [], "network": []}
    run("docker", "image", "prune", "-f")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_gpu_image_installs_onnxruntime_gpu_and_no_torch_and_runs_itsd_as_uid_1000_on_a_debian_base(engine):
    # CUDA's base cannot be pulled here: the same Dockerfile on the Debian base proves the Python stage (the
    # build itself runs `pip check` and refuses torch) and the entrypoint, not CUDA or TensorRT at run time.
    print(f"\nitsd-worker:debian: built in {build_images('gpu')} s, {image_size('itsd-worker:debian') / 1e6:.0f} MB")
    probe = (
        "import importlib.metadata as m, json, os, onnxruntime;"
        "print(json.dumps({'uid': os.getuid(), 'providers': onnxruntime.get_available_providers(),"
        "'dists': sorted(d.metadata['Name'].lower() for d in m.distributions())}))"
    )
    try:
        found = json.loads(checked("docker", "run", "--rm", "--network", "none", "--entrypoint", "python3",
                                   "itsd-worker:debian", "-c", probe))  # fmt: skip
        usage = checked("docker", "run", "--rm", "--network", "none", "itsd-worker:debian", "worker", "--help")
    finally:
        run("docker", "image", "rm", "itsd-worker:debian")
    assert found["uid"] == 1000
    assert {"CUDAExecutionProvider", "TensorrtExecutionProvider"} <= set(found["providers"])
    assert {"onnxruntime-gpu", "s3fs", "celery", "tokenizers"} <= set(found["dists"])
    assert not {"onnxruntime", "torch", "openvino"} & set(found["dists"])
    assert "--device" in usage
