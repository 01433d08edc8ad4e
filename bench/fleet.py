"""Fleet benchmark: how close N workers come to N times one, and what the queue costs per job.

A stand-in model of fixed cost (it sleeps, so 4 workers fit on 2 cores) runs behind the real system:
a private redis-server, real `itsd worker` processes (Celery prefork), real jobs with files read and
written. The baseline is the ideal in the same run: N workers / cost images per second.

    python bench/fleet.py [--cost 2.0] [--workers 1,2,4] [--jobs-per-worker 6] [--latency-samples 20]

prints one JSON line:
- per worker count: images/s, efficiency against the ideal, wall seconds;
- per_job_overhead_ms p50/p95: time between a worker's consecutive job starts, minus the cost (fetch,
  claim, read, decode, encode, write, record, ack);
- submit_to_start_ms p50/p95: an idle worker, one job at a time, from the producer's submit call to the
  worker starting the job (model cost 0);
- metrics_overhead: one worker, a model of cost 0, the same number of jobs without and with
  `--metrics-port` (prometheus_client's multiprocess mode): the time between job starts, p50/p95, each way.

    python bench/fleet.py ... [--metrics-jobs 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from core.params import EditParams
from core.settings import Settings
from core.standin import StandInModel
from producer.batch import Broker, results, submit_batch
from producer.local import LocalWorker, RedisServer, free_port, wait_registered
from producer.sources import BatchInput
from producer.submit import wait_for


class FixedCost(StandInModel):
    """A model that takes exactly `seconds` and returns its input."""

    def __init__(self, seconds: float) -> None:
        super().__init__(on_image=lambda: time.sleep(seconds))


def serve_stand_in(argv: list[str]) -> None:
    """Worker process entry: `fleet.py --serve --cost S --concurrency 1 --hostname NAME [--loglevel L]`."""
    from worker.jobs import ModelSpec
    from worker.serving import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--cost", type=float)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--hostname")
    parser.add_argument("--loglevel", default="WARNING")
    args = parser.parse_args(argv)
    name = model_name(args.cost)
    spec = ModelSpec(name, f"stand-in-{args.cost}s", "bench", lambda: FixedCost(args.cost))
    port = os.environ.get("ITSD_METRICS_PORT")
    serve(
        os.environ["ITSD_BROKER_URL"],
        {name: spec},
        args.concurrency,
        args.hostname,
        loglevel=args.loglevel,
        metrics_port=int(port) if port else None,
    )


def model_name(cost: float) -> str:
    return f"standin-{int(cost * 1000)}ms"


def sources(folder: Path, count: int, offset: int) -> list[BatchInput]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    found = []
    for i in range(offset, offset + count):
        path = folder / f"{i:05d}.png"
        Image.fromarray(np.full((64, 64, 3), i % 251, np.uint8)).save(path)  # distinct bytes, distinct job ids
        found.append(BatchInput(str(path), Path(path.name), f"bench {i}", PARAMS))
    return found


PARAMS = EditParams(steps=1, seed=0, max_side=64)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered) * 1000, 1),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
    }


def start_workers(
    url: str, cost: float, count: int, work: Path, first: int = 0, loglevel: str = "WARNING", **env: str
) -> list[LocalWorker]:
    """Stand-in workers (named bench<first>, ...) whose roots are `work`, where the jobs' inputs and outputs are."""
    command = [sys.executable, __file__, "--serve", "--cost", str(cost), "--loglevel", loglevel]
    env = {"ITSD_INPUT_ROOTS": str(work), "ITSD_OUTPUT_ROOTS": str(work), **env}
    return [
        LocalWorker(url, {}, f"bench{i}", work / f"w{i}.log", extra_env=env, command=list(command)).start()
        for i in range(first, first + count)
    ]


def warm_up(broker: Broker, cost: float, fleet: list[LocalWorker], work: Path) -> None:
    """Wait until every worker has booted and loaded its model: one untimed job per worker."""
    wait_registered(broker.client, [model_name(cost)], fleet)
    batch = sources(work, len(fleet), offset=50_000 + 100 * len(fleet))
    wait_for(broker, submit_batch(broker, batch, [], str(work / "out"), model_name(cost)).batch_id, quiet=True)


def throughput(broker: Broker, cost: float, workers: int, per_worker: int, work: Path) -> tuple[dict, list[float]]:
    fleet = start_workers(broker.url, cost, workers, work)
    try:
        warm_up(broker, cost, fleet, work / f"warm{workers}")
        batch = sources(work / f"in{workers}", workers * per_worker, offset=1000 * workers)
        start = time.time()
        submission = submit_batch(broker, batch, [], str(work / f"out{workers}"), model_name(cost))
        wait_for(broker, submission.batch_id, quiet=True, poll=0.05)
        found = [r for r in results(broker.client, submission.batch_id) if r.status == "done"]
    finally:
        for worker in fleet:
            worker.stop()
    wall = max(r.finished_at for r in found) - start
    rate = len(found) / wall
    gaps = []
    for name in {r.worker for r in found}:
        starts = sorted(r.started_at for r in found if r.worker == name)
        gaps += [b - a - cost for a, b in itertools.pairwise(starts)]
    row = {"images_per_s": round(rate, 3), "efficiency": round(rate / (workers / cost), 3), "wall_s": round(wall, 2)}
    return row, gaps


def submit_to_start(broker: Broker, samples: int, work: Path) -> list[float]:
    fleet = start_workers(broker.url, 0.0, 1, work)
    latencies = []
    try:
        warm_up(broker, 0.0, fleet, work / "warm-latency")
        for i, source in enumerate(sources(work / "latency", samples, offset=90_000)):
            sent = time.time()
            submission = submit_batch(broker, [source], [], str(work / f"lat{i}"), model_name(0.0))
            wait_for(broker, submission.batch_id, quiet=True, poll=0.01)
            (result,) = results(broker.client, submission.batch_id)
            latencies.append(result.started_at - sent)
    finally:
        for worker in fleet:
            worker.stop()
    return latencies


def metrics_overhead(broker: Broker, jobs: int, work: Path) -> dict:
    """Gaps between one worker's consecutive job starts (model cost 0), without and with --metrics-port."""
    row: dict = {}
    for offset, (label, env) in enumerate([("without", {}), ("with", {"ITSD_METRICS_PORT": str(free_port())})]):
        (work / label).mkdir(parents=True)
        fleet = start_workers(broker.url, 0.0, 1, work / label, **env)
        try:
            warm_up(broker, 0.0, fleet, work / label / "warm")
            batch = sources(work / label / "in", jobs, offset=200_000 + 10_000 * offset)
            submission = submit_batch(broker, batch, [], str(work / label / "out"), model_name(0.0))
            wait_for(broker, submission.batch_id, quiet=True, poll=0.05)
            starts = sorted(r.started_at for r in results(broker.client, submission.batch_id) if r.status == "done")
            if env:  # the metrics counted what ran: warm-up jobs and these
                with urllib.request.urlopen(f"http://127.0.0.1:{env['ITSD_METRICS_PORT']}/metrics") as page:
                    text = page.read().decode()
                row["counted"] = next(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith('itsd_jobs_total{model="standin-0ms",status="done"}')
                )
        finally:
            for worker in fleet:
                worker.stop()
        row[f"{label}_ms"] = percentiles([b - a for a, b in itertools.pairwise(starts)])
    row["added_ms_p50"] = round(row["with_ms"]["p50"] - row["without_ms"]["p50"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost", type=float, default=2.0, help="Seconds per job of the stand-in model.")
    parser.add_argument("--workers", default="1,2,4", help="Worker counts to measure.")
    parser.add_argument("--jobs-per-worker", type=int, default=6)
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument("--metrics-jobs", type=int, default=200, help="Jobs per side of the metrics comparison.")
    args = parser.parse_args()
    figures: dict = {"cost_s": args.cost, "jobs_per_worker": args.jobs_per_worker}
    with tempfile.TemporaryDirectory(prefix="itsd-bench-") as tmp, RedisServer() as redis:
        broker = Broker(redis.url, Settings.from_env())
        gaps: list[float] = []
        for workers in (int(n) for n in args.workers.split(",")):
            row, more = throughput(broker, args.cost, workers, args.jobs_per_worker, Path(tmp))
            figures[f"workers_{workers}"] = row
            gaps += more
        figures["per_job_overhead_ms"] = percentiles(gaps)
        figures["submit_to_start_ms"] = percentiles(submit_to_start(broker, args.latency_samples, Path(tmp)))
        figures["metrics_overhead"] = metrics_overhead(broker, args.metrics_jobs, Path(tmp) / "metrics")
    print(json.dumps(figures))


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve_stand_in(sys.argv[1:])
    else:
        main()
