"""Containers against host processes: images/s of N container workers (compose.cpu.yaml, `--scale worker=N`)
and of N `itsd worker` processes on the host, the same bundled model (itsd-tiny), photos and edit parameters.

Both sides are warm before the clock starts: every worker has registered the model. The clock runs from the
producer's submit to its `--wait` returning (the producer runs in a container for the first, on the host for
the second). Also: the CPU image's size and, for the containers, seconds from `compose up` to every worker
registered. Needs the images (scripts/images all cpu) and a Docker engine (started here as root when none runs).

    python bench/containers.py [--workers 3] [--photos 60] [--size 128] [--steps 20]

prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from containers import REPO, CpuFleet, bundled_model, docker_engine, image_size
from fleet import photo_folder, workers

from core.records import Keys
from producer.local import RedisServer


def edit_args(inputs: str, out: str, steps: int) -> list[str]:
    return ["submit", inputs, "-i", "Cartoonize the image", "-m", "tiny", "-o", out, "--steps", str(steps)]


def containers(root: Path, count: int, steps: int) -> dict[str, float]:
    fleet = CpuFleet(root, f"itsd-bench-{os.getpid()}")
    photo_folder(fleet.data / "in", args.photos, (args.size, args.size))
    try:
        up = time.monotonic()
        fleet.compose("up", "-d", "--scale", f"worker={count}")
        while len(fleet.redis("HKEYS", Keys.workers).split()) < count:
            time.sleep(0.5)
        registered = time.monotonic() - up
        start = time.monotonic()
        producer = fleet.producer(*edit_args("/data/in", "/data/out", steps), "--wait", "-q")
        log, _ = producer.communicate(timeout=1800)
        assert producer.returncode == 0, log.decode()
        seconds = time.monotonic() - start
    finally:
        fleet.down()
    return {"images_per_s": round(args.photos / seconds, 3), "up_to_all_registered_s": round(registered, 1)}


def host(root: Path, count: int, steps: int) -> dict[str, float]:
    model = bundled_model(root / "models", "tiny")
    inputs = photo_folder(root / "in", args.photos, (args.size, args.size))
    with RedisServer(root / "redis") as redis, workers(redis, root, *[{"tiny": str(model)}] * count):
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "producer.cli", *edit_args(str(inputs), str(root / "out"), steps), "--wait", "-q"],
            env={**os.environ, "ITSD_BROKER_URL": redis.url},
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        seconds = time.monotonic() - start
    return {"images_per_s": round(args.photos / seconds, 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ["ITSD_PRECISION"] = "fp32"  # as CpuFleet's workers: no bf16/int8 probe on either side
    with tempfile.TemporaryDirectory() as tmp, docker_engine():
        result = {
            "workers": args.workers,
            "photos": args.photos,
            "size": args.size,
            "steps": args.steps,
            "image_mb": round(image_size("itsd-worker-cpu:latest") / 1e6),
            "containers": containers(Path(tmp) / "containers", args.workers, args.steps),
            "host": host(Path(tmp) / "host", args.workers, args.steps),
        }
    result["containers_over_host"] = round(result["containers"]["images_per_s"] / result["host"]["images_per_s"], 3)
    print(json.dumps(result))
