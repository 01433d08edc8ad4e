"""`itsd submit`, `status`, `collect`, `cancel`: a batch on a fleet of workers, through Redis."""

from __future__ import annotations

import base64
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from core.errors import ItsdError
from core.inputs import safe_relative
from core.job import Job
from core.params import EditParams
from core.records import Keys
from core.redis_url import check_broker_url, redact, redis_client
from core.settings import Settings
from core.storage import write_atomic
from producer.batch import Broker, Submission, batch_record, cancel_batch, progress, results, submit_batch
from producer.options import broker_url_option, edit_options
from producer.recovery import requeue_lost
from producer.sources import collect_sources

FAILURES_SHOWN = 20


def broker_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--broker (or ITSD_BROKER_URL), turned into a connected `Broker`."""

    @broker_url_option
    @functools.wraps(command)
    def wrapper(*args: Any, broker: str | None, **kwargs: Any) -> Any:
        return command(*args, broker=Broker(check_broker_url(broker), Settings.from_env()), **kwargs)

    return wrapper


def wait_for(
    broker: Broker,
    batch_id: str,
    quiet: bool = False,
    poll: float = 0.5,
    stalled_after: float = 30.0,
    timeout: float = float("inf"),
    supervise: Callable[[], list[str]] | None = None,
) -> dict[str, int]:
    """Block until every job of the batch is final, with a progress bar (done, failed, images/s, ETA). While
    Redis is unreachable it says so on one line within seconds (its polls do not retry) and keeps waiting, as
    the workers do; Ctrl-C stops it. After each `stalled_after` seconds without progress it hands back the
    jobs of workers that died holding them, and sends again jobs whose message was lost. `supervise`, called
    at each poll, returns lines to show (`itsd run`'s workers: producer.local.Supervisor). After `timeout`
    seconds it returns the counts so far."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    client = redis_client(broker.url, retries=0, timeout=broker.settings.connect_timeout)
    total, counts = progress(broker.client, batch_id)
    unreachable, moved, seen = False, time.monotonic(), 0
    deadline = moved + timeout
    with tqdm(total=total, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
        while True:
            finished = sum(counts.values())
            bar.set_postfix(done=counts["done"] + counts["skipped"], failed=counts["failed"], refresh=False)
            if finished != seen:
                moved, seen = time.monotonic(), finished
            bar.update(finished - bar.n)
            if finished >= total or time.monotonic() > deadline:
                return counts
            time.sleep(poll)
            for line in supervise() if supervise else []:
                bar.write(line, sys.stderr)
            try:
                if time.monotonic() - moved > stalled_after:  # no progress: did a job's holder die, or its message?
                    moved = time.monotonic()
                    resend_lost(broker, batch_id, bar, client)
                total, counts = progress(client, batch_id)
            except (RedisConnectionError, RedisTimeoutError, OperationalError):
                if not unreachable:
                    bar.write(
                        f"Redis at {redact(broker.url)} is unreachable; waiting for it (Ctrl-C stops)", sys.stderr
                    )
                unreachable = True
                continue
            if unreachable:
                bar.write("Redis is back; carrying on", sys.stderr)
                unreachable = False


def resend_lost(broker: Broker, batch_id: str, bar: tqdm, client: Any) -> None:
    """Hand back the jobs of workers that died holding them, send again those whose message was lost, and say so."""
    handed, lost = requeue_lost(broker, batch_id, client)
    if handed:
        bar.write(f"{handed} job(s) held by a worker that died: handed back to the queue", sys.stderr)
    if lost:
        bar.write(f"{lost} job(s) lost their message (Redis stopped as a worker took it): sent again", sys.stderr)


def describe(counts: dict[str, int], total: int) -> str:
    parts = [f"{counts['done']} done", f"{counts['skipped']} skipped (already there)", f"{counts['failed']} failed"]
    if counts["cancelled"]:
        parts.append(f"{counts['cancelled']} cancelled")
    pending = total - sum(counts.values())
    return ", ".join(parts + ([f"{pending} pending"] if pending else [])) + f" of {total}"


def echo_failures(broker: Broker, batch_id: str, limit: int = FAILURES_SHOWN) -> None:
    failed = [r for r in results(broker.client, batch_id) if r.status == "failed"]
    for result in failed[:limit]:
        name = input_name(broker.client.hget(Keys(batch_id).jobs, result.job_id)) or result.job_id[:12]
        click.echo(f"  failed {name}: {result.error_type}: {result.error_message}", err=True)
    if len(failed) > limit:
        click.echo(f"  ... and {len(failed) - limit} more (itsd status {batch_id} --json)", err=True)


def input_name(job: bytes | None) -> str | None:
    """What a person calls a job's input: its path or URL, or (inline) its key; None if unknown."""
    if job is None:
        return None
    found = json.loads(job)
    if not isinstance(found, dict):
        return None
    return found.get("input_uri") or found.get("relative")


def collect_outputs(broker: Broker, batch_id: str, out: Path) -> int:
    """Write a batch's inline outputs under OUT by their keys; returns how many were written."""
    keys, written = Keys(batch_id), 0
    for job_id, encoded in broker.client.hscan_iter(keys.outputs, count=100):
        job = Job.from_dict(json.loads(broker.client.hget(keys.jobs, job_id)))
        write_atomic(out / safe_relative(job.relative or job_id.decode()), base64.b64decode(encoded))
        written += 1
    return written


def report(broker: Broker, submission: Submission) -> None:
    click.echo(
        f"batch {submission.batch_id}: {submission.total} job(s); {submission.queued} queued, "
        f"{submission.finished} already done"
        + (f", {submission.in_flight} still queued or running (not sent again)" if submission.in_flight else "")
        + (f", {submission.failed} refused" if submission.failed else "")
    )


@click.command()
@click.argument("inputs", metavar="INPUTS...", nargs=-1, required=True)
@click.option("--instruction", "-i", default="", help="What to do; a manifest row may give its own.")
@click.option("--model", "-m", required=True, metavar="NAME", help="Model to use: its workers consume itsd.NAME.")
@click.option("--out", "-o", "out", required=True, metavar="DEST", help="Destination folder or URL for outputs.")
@edit_options
@click.option(
    "--inline",
    is_flag=True,
    help="Send images inside the jobs and keep outputs in Redis (for workers without shared storage); "
    "`itsd collect` writes them.",
)
@click.option(
    "--overwrite", is_flag=True, help="Recompute jobs whose output exists; also a batch made by a replaced model."
)
@click.option("--wait", is_flag=True, help="Wait with a progress bar until the batch is finished.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@broker_option
def submit(
    inputs: tuple[str, ...],
    instruction: str,
    model: str,
    out: str,
    params: EditParams,
    inline: bool,
    overwrite: bool,
    wait: bool,
    quiet: bool,
    broker: Broker,
) -> None:
    """Queue INPUTS... (files, folders, globs, URLs, or .csv/.jsonl manifests) as one batch and print
    its id. No worker need be up: the jobs wait for one. Submitting the same batch again resumes it: finished
    jobs are not recomputed. Only URLs of the schemes the workers allow (ITSD_URL_SCHEMES) are read here; a
    symlink must name a file under the folder it was found in (a folder given, or a named file's own). Either
    fails alone otherwise."""
    try:  # a destination the workers would refuse is not checked for outputs from here either
        local = broker.settings.access.check_scheme(out).path
    except ItsdError as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None
    destination = out if local is None else str(local.resolve())
    sources, rejected = collect_sources(list(inputs), instruction.strip(), params, broker.settings.access)
    if any(not s.instruction for s in sources):
        raise click.BadParameter("the instruction is empty", param_hint="--instruction")
    if not sources and not rejected:
        raise click.ClickException(f"no images found in {' '.join(inputs)}")
    with tqdm(total=len(sources), unit="img", desc="reading", disable=quiet, file=sys.stderr, leave=False) as bar:
        submission = submit_batch(broker, sources, rejected, destination, model, inline, overwrite, bar.update)
    report(broker, submission)
    if not wait:
        if submission.failed:  # refused here (a bad row, an input the workers would refuse): say why now
            echo_failures(broker, submission.batch_id)
        click.echo(f"follow it with: itsd status {submission.batch_id}")
        return
    finish(broker, submission.batch_id, Path(out) if inline else None, quiet)


def finish(broker: Broker, batch_id: str, collect_into: Path | None, quiet: bool) -> dict[str, int]:
    """Wait, collect inline outputs, summarise; exit status 1 when any job failed."""
    counts = wait_for(broker, batch_id, quiet)
    if collect_into is not None:
        collect_outputs(broker, batch_id, collect_into)
    total = int(batch_record(broker.client, batch_id)["total"])
    click.echo(f"batch {batch_id}: {describe(counts, total)}")
    if counts["failed"]:
        echo_failures(broker, batch_id)
        sys.exit(1)
    return counts


@click.command()
@click.argument("batch_id", metavar="BATCH")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), help="[default: the batch's --out]")
@broker_option
def collect(batch_id: str, out: Path | None, broker: Broker) -> None:
    """Write the inline results of BATCH (submitted with --inline) to files."""
    record = batch_record(broker.client, batch_id)
    if record.get("inline") != "1":
        click.echo(f"batch {batch_id} wrote its outputs to {record['destination']} directly; nothing to collect")
        return
    target = out or Path(record["destination"])
    click.echo(f"collected {collect_outputs(broker, batch_id, target)} output(s) into {target}")


@click.command()
@click.argument("batch_id", metavar="BATCH")
@broker_option
def cancel(batch_id: str, broker: Broker) -> None:
    """Cancel BATCH: jobs still queued are recorded as cancelled and never run."""
    left = cancel_batch(broker.client, batch_id)
    click.echo(f"batch {batch_id} cancelled; {left} unfinished job(s) will not run")
