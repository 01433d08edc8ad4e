"""Soak: thousands of small jobs through several workers while faults land at random, then a count.

The real system runs a stand-in model of fixed cost (bench/fleet.py's): a redis-server with AOF (as compose
runs it), real `itsd worker` processes (Celery prefork) with the default settings (an hour's visibility
timeout, a 60 s claim TTL), real files read and written. While the batch runs, every few seconds one fault,
drawn at random:
- `child`: SIGKILL one pool process of a worker (Celery starts another);
- `worker_group`: SIGKILL a worker's whole process group, pool included, as the OOM killer may (a new worker
  takes its place, as a supervisor would); the job it held must come back without the visibility timeout;
- `redis_restart`: stop Redis cleanly and start it again on its AOF;
- `redis_kill`: SIGKILL Redis, then start it again on its AOF a second later;
- `redis_kills`: SIGKILL Redis three times close together, each time down for 2 s and up for 0.5-2 s.

    python bench/soak.py [--jobs 2000] [--workers 3] [--cost 0.02] [--faults 12] [--seed 0] [--kinds a,b]

prints one JSON line: outputs expected, written, lost (expected minus written), duplicated (jobs recorded
`done` more than once: computed and written twice, counted from the workers' logs), delivered again (jobs
a fault handed out a second time), jobs whose message a fault lost and the waiting producer sent again
(producer/recovery.py), the batch's final counts, each fault's count (all landed while jobs
were running) and when each landed, the longest time the batch went without a job finishing (sampled every
0.2 s; Redis down counts) and when it began, and seconds to drain after the last fault.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fleet import model_name, sources, start_workers

from core.records import Keys, status_counts
from core.redis_url import redis_client
from core.settings import Settings
from producer.batch import Broker, submit_batch
from producer.local import LocalWorker, RedisServer, wait_registered
from producer.submit import wait_for

FAULTS = ("child", "worker_group", "redis_restart", "redis_kill", "redis_kills")
DONE = re.compile(rb"\bjob ([0-9a-f]{16,}) done\b")


def pool_children(worker: LocalWorker) -> list[int]:
    assert worker.process is not None
    found = subprocess.run(["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


class Soak:
    def __init__(self, redis: RedisServer, args: argparse.Namespace, work: Path) -> None:
        self.redis, self.args, self.work = redis, args, work
        self.fleet = self._start(args.workers)

    def _start(self, count: int, first: int = 0) -> list[LocalWorker]:
        cost, work = self.args.cost, self.work
        return start_workers(self.redis.url, cost, count, work, first, "INFO")

    def inject(self, fault: str) -> None:
        if fault == "child":
            alive = [w for w in self.fleet if w.alive() and pool_children(w)]
            if alive:
                os.kill(random.choice(pool_children(random.choice(alive))), signal.SIGKILL)
        elif fault == "worker_group":
            victim = random.choice([w for w in self.fleet if w.alive()])
            victim.kill()  # SIGKILL to its process group: the worker and its pool children at once
            self.fleet += self._start(1, first=len(self.fleet))
        elif fault == "redis_restart":
            self.redis.restart()
        elif fault == "redis_kill":
            self.redis.kill()
            time.sleep(1)
            self.redis.start()
        else:
            for kill in range(3):
                time.sleep(random.uniform(0.5, 2.0) if kill else 0)
                self.redis.kill()
                time.sleep(2)
                self.redis.start()

    def stop(self) -> None:
        for worker in self.fleet:
            worker.stop()

    def done_records(self) -> collections.Counter[str]:
        """How many times each job was recorded done, over every worker's log."""
        counts: collections.Counter[str] = collections.Counter()
        for worker in self.fleet:
            counts.update(m.decode() for m in DONE.findall(worker.log_path.read_bytes()))
        return counts


def finished(client: object, batch_id: str) -> int:
    return sum(status_counts(client, Keys(batch_id)).values())


class StallWatch(threading.Thread):
    """Samples the batch's finished count every 0.2 s (a sample that fails, Redis being down, counts as no
    progress): the longest time without a job finishing, until the batch is finished or `stop`."""

    def __init__(self, url: str, batch_id: str, total: int) -> None:
        super().__init__(daemon=True)
        self.client, self.batch_id, self.total = redis_client(url, retries=0, timeout=1.0), batch_id, total
        self.longest, self.stopped, self.began = 0.0, threading.Event(), time.monotonic()
        self.longest_from = 0.0  # seconds into the watch

    def run(self) -> None:
        seen, since = -1, time.monotonic()
        while not self.stopped.wait(0.2):
            try:
                now_finished = finished(self.client, self.batch_id)
            except Exception:  # Redis down: no progress seen
                now_finished = seen
            if now_finished != seen:
                seen, since = now_finished, time.monotonic()
            if time.monotonic() - since > self.longest:
                self.longest, self.longest_from = time.monotonic() - since, since - self.began
            if seen >= self.total:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--cost", type=float, default=0.02, help="Seconds per job of the stand-in model.")
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--gap", type=float, default=3.0, help="Mean seconds between faults.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kinds", type=lambda v: v.split(","), default=list(FAULTS), help=f"Faults to draw from: {','.join(FAULTS)}."
    )
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    args = parser.parse_args()
    random.seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="itsd-soak-") as tmp:
        work = Path(tmp)
        (work / "redis").mkdir()
        with RedisServer(work / "redis", appendonly=True) as redis:
            soak = Soak(redis, args, work)
            try:
                figures = run(soak, args, work)
            finally:
                soak.stop()
    print(json.dumps(figures))


def run(soak: Soak, args: argparse.Namespace, work: Path) -> dict:
    broker = Broker(soak.redis.url, Settings.from_env())
    wait_registered(broker.client, [model_name(args.cost)], soak.fleet)
    batch = sources(work / "in", args.jobs, offset=0)
    start = time.monotonic()
    submission = submit_batch(broker, batch, [], str(work / "out"), model_name(args.cost))
    time.sleep(1.5)  # Redis appends every second: let the whole batch reach its AOF before the first fault
    client = redis_client(soak.redis.url)  # it retries through Redis' restarts
    watch = StallWatch(soak.redis.url, submission.batch_id, submission.total)
    watch.start()
    injected: collections.Counter[str] = collections.Counter()
    timeline: list[tuple[float, str]] = []  # (seconds into the batch, fault)
    last_fault = time.monotonic()
    while sum(injected.values()) < args.faults:
        time.sleep(random.expovariate(1 / args.gap))
        if finished(client, submission.batch_id) >= submission.total:
            break  # every fault counted landed while jobs were running
        fault = random.choice(args.kinds)
        timeline.append((round(time.monotonic() - watch.began, 1), fault))
        soak.inject(fault)
        injected[fault] += 1
        last_fault = time.monotonic()
    wait_for(broker, submission.batch_id, quiet=True, poll=0.2, timeout=args.drain_timeout)  # as `--wait` waits
    drained = time.monotonic()
    watch.stopped.set()
    written = sum(1 for path in (work / "out").rglob("*.png"))
    records = soak.done_records()
    counts = status_counts(client, Keys(submission.batch_id))
    attempts = [int(n) for n in client.hvals(Keys(submission.batch_id).attempts)]
    return {
        "jobs": args.jobs,
        "workers": args.workers,
        "cost_s": args.cost,
        "faults": dict(injected),
        "expected": submission.total,
        "written": written,
        "lost": submission.total - written,
        "duplicated": sum(1 for n in records.values() if n > 1),
        "delivered_again": sum(1 for n in attempts if n > 1),  # handed out again after a fault, run once
        "requeued_lost": int(client.hget(Keys(submission.batch_id).batch, "requeued") or 0),
        "counts": counts,
        "unfinished": submission.total - sum(counts.values()),
        "longest_stall_s": round(watch.longest, 1),
        "longest_stall_from_s": round(watch.longest_from, 1),
        "fault_times_s": timeline,
        "drain_s_after_last_fault": round(drained - last_fault, 1),
        "wall_s": round(drained - start, 1),
        "workers_started": len(soak.fleet),
    }


if __name__ == "__main__":
    sys.exit(main())
