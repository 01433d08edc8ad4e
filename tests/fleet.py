"""Helpers for the queue tests: a real redis-server per module, real worker processes, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from producer.local import LocalWorker, RedisServer, wait_registered

REPO = Path(__file__).resolve().parent.parent


def itsd(
    url: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run the real `itsd` CLI in a subprocess against the broker at URL, in folder `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env={**os.environ, **(env or {}), "ITSD_BROKER_URL": url},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@contextmanager
def workers(
    redis: RedisServer, logs: Path, *specs: dict[str, str], concurrency: int = 1, env: dict[str, str] | None = None
) -> Iterator[list[LocalWorker]]:
    """One worker process per spec ({model name: artifact folder}), stopped (and checked gone) after. Their
    input and output roots are `logs`, the test's own folder, unless `env` says otherwise."""
    env = {"ITSD_INPUT_ROOTS": str(logs), "ITSD_OUTPUT_ROOTS": str(logs), **(env or {})}
    started = [
        LocalWorker(redis.url, spec, f"w{i}", logs / f"w{i}-{time.monotonic_ns()}.log", concurrency, env).start()
        for i, spec in enumerate(specs)
    ]
    try:
        from core.redis_url import redis_client

        wait_registered(redis_client(redis.url), sorted({m for s in specs for m in s}), started)
        yield started
    finally:
        for worker in started:
            worker.stop(grace=20)


def submit(url: str, inputs: Path, out: Path, instruction: str, *options: str, model: str = "a", cwd: Path = REPO):
    """`itsd submit INPUTS -i INSTRUCTION -m MODEL -o OUT [options]` against the broker at URL."""
    return itsd(url, "submit", str(inputs), "-i", instruction, "-m", model, "-o", str(out), *options, cwd=cwd)


def photo_folder(folder: Path, count: int, size: tuple[int, int], broken: bool = False) -> Path:
    """`count` photos p0.png... in `folder`, and with `broken` a file named broken.png that is no image."""
    from conftest import photo

    folder.mkdir(parents=True)
    for i in range(count):
        photo(*size, seed=i).save(folder / f"p{i}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG no")
    return folder
