"""What an operator watches on the command line: `itsd workers` (who serves what, on what) and the live view
of `itsd status BATCH --watch`. Both read a few small Redis keys per refresh, never a batch's results, so
they cost the same for a batch of ten and one of a million."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import click

from core.job import Result
from core.queue import WORKER_HEARTBEAT_S
from core.records import PIN, Keys, status_counts
from producer.batch import Broker, batch_record, per_worker, progress, results
from producer.submit import broker_option, describe, echo_failures, input_name


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def worker_rows(client: Any, now: float | None = None) -> list[dict[str, Any]]:
    """Every worker's record, with `state`: up, or gone when it missed three heartbeats (killed, or cut off)."""
    now = time.time() if now is None else now
    rows = []
    for name, raw in sorted(client.hgetall(Keys.workers).items()):
        entry = json.loads(raw)
        late = now - entry.get("seen_at", 0)
        rows.append({"worker": name.decode(), "state": "up" if late < 3 * WORKER_HEARTBEAT_S else "gone", **entry})
    return rows


def print_workers(rows: list[dict[str, Any]], now: float) -> None:
    if not rows:
        click.echo("no worker has registered on this broker")
        return
    for row in rows:
        models = ", ".join(f"{name} ({info.get('runtime') or '?'})" for name, info in row["models"].items())
        slots = f"{row['batch_jobs']} batched" if row.get("batch_jobs", 1) > 1 else f"{row['concurrency']} process(es)"
        click.echo(
            f"{row['worker']}  {row['state']}  {models}  device {row['device']}  {slots}  "
            f"pid {row['pid']} on {row['host']}  seen {_ago(now - row['seen_at'])}"
        )


@dataclass
class Watch:
    """A batch's live view: counts, images/s and ETA from the change since watching began, per-worker rates
    from the per-worker done counts, and the latest failures."""

    broker: Broker
    batch_id: str
    started: float = field(default_factory=time.monotonic)
    first_done: int | None = None
    first_by_worker: dict[str, int] = field(default_factory=dict)

    def frame(self) -> tuple[str, bool]:
        """The text to show now, and whether the batch is finished."""
        client, keys = self.broker.client, Keys(self.batch_id)
        record = batch_record(client, self.batch_id)
        counts = status_counts(client, keys)
        by_worker = {k.decode(): int(v) for k, v in client.hgetall(keys.by_worker).items()}
        total, finished = int(record["total"]), sum(counts.values())
        if self.first_done is None:
            self.first_done, self.first_by_worker = counts["done"], dict(by_worker)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (counts["done"] - self.first_done) / elapsed
        left = total - finished
        eta = f"ETA {left / rate:.0f} s" if rate > 0 and left else ("finished" if not left else "ETA ?")
        state = "cancelled" if record.get("cancelled") == "1" else ("finished" if not left else "running")
        lines = [
            f"batch {self.batch_id} ({state}): " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {total}",
            f"  {rate:.2f} img/s over the last {elapsed:.0f} s, {eta}",
        ]
        for worker, done in sorted(by_worker.items()):
            worker_rate = (done - self.first_by_worker.get(worker, 0)) / elapsed
            lines.append(f"  {worker}: {done} done, {worker_rate:.2f} img/s")
        failures = [Result.from_dict(json.loads(raw)) for raw in client.lrange(keys.failures, 0, 4)]
        if failures:
            lines.append("  latest failures:")
            for r in failures:  # named by their input, as `submit --wait` names them
                name = input_name(client.hget(keys.jobs, r.job_id)) or r.job_id[:12]
                lines.append(f"    {name}: {r.error_type}: {r.error_message}")
        return "\n".join(lines), not left or state == "cancelled"


def follow(broker: Broker, batch_id: str, interval: float) -> None:
    """Redraw the batch's view every `interval` seconds until it is finished (a terminal is cleared between
    frames; a pipe gets one block per refresh)."""
    view = Watch(broker, batch_id)
    tty = click.get_text_stream("stdout").isatty()
    while True:
        text, done = view.frame()
        if tty:
            click.clear()
        click.echo(text)
        if done:
            return
        time.sleep(interval)


@click.command()
@click.argument("batch_id", metavar="BATCH")
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object, failures included.")
@click.option("--watch", "-w", is_flag=True, help="A live view until the batch is finished: counts, img/s, ETA.")
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True, help="Seconds between frames.")
@broker_option
def status(batch_id: str, as_json: bool, watch: bool, interval: float, broker: Broker) -> None:
    """Counts, failures with their reasons, and throughput per worker of BATCH; --watch follows it live."""
    if watch:
        follow(broker, batch_id, interval)
        return
    record = batch_record(broker.client, batch_id)
    total, counts = progress(broker.client, batch_id)
    found = list(results(broker.client, batch_id))
    workers = per_worker(found)
    if as_json:
        failures = [r.to_dict() for r in found if r.status == "failed"]
        summary = {"batch": record, "total": total, "counts": counts, "workers": workers, "failures": failures}
        click.echo(json.dumps(summary, indent=2))
        return
    state = "finished" if sum(counts.values()) >= total else "running"
    state = "cancelled" if record.get("cancelled") == "1" else state
    click.echo(f"batch {batch_id} ({state}): {describe(counts, total)}")
    pinned = record.get(PIN) or "not pinned yet: no worker has run one of its jobs"
    click.echo(f"model {record['model']} ({pinned}), outputs in {record['destination']}")
    for worker, row in workers.items():
        click.echo(f"  {worker}: {row['done']} done, {row['images_per_s']} img/s, {row['s_per_image']} s/img")
    echo_failures(broker, batch_id)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="The records as JSON.")
@broker_option
def workers(as_json: bool, broker: Broker) -> None:
    """Which workers serve which models, with what runtime, on which device; gone: no heartbeat for 45 s."""
    now = time.time()
    rows = worker_rows(broker.client, now)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        print_workers(rows, now)
