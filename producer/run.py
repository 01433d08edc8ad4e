"""`itsd run`: the whole system on one machine. A private, password-protected Redis (unless --broker),
N local workers, one batch with a progress bar, then a clean shutdown (Ctrl-C and SIGTERM included),
a summary JSON and a before/after contact sheet (producer.record). When every output is there already, it
starts nothing and only brings the record up to date.

`--model` takes an artifact folder, or a diffusers checkpoint (a folder, or a Hub id when online) that
is exported on first use and cached by its content hash under ITSD_CACHE_DIR (producer.models).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from core.inputs import InputFile, check_destination
from core.job import Result
from core.manifest import Manifest
from core.params import EditParams
from core.redis_url import check_broker_url
from core.settings import Settings
from core.storage import locate
from producer.batch import Broker, refusals, results, submit_batch
from producer.local import LocalWorker, RedisServer, Supervisor, wait_registered
from producer.models import artifacts_for
from producer.options import (
    edit_options,
    instruction_option,
    missing_instruction,
    model_option,
    no_password_on_argv,
    runtime_options,
    tile_batch_option,
)
from producer.record import output_of, write_record
from producer.sources import BatchInput, Rejected, collect_sources
from producer.submit import describe, echo_failures, wait_for

Say = Callable[[str], None]  # a status line on stderr (nothing under --quiet)


def local_roots(sources: list[BatchInput], out: Path) -> dict[str, str]:
    """The roots the local workers need: the folders of this batch's local inputs (of what a symlink names: the
    sources allow only links within the folder they were found in), and OUT."""
    folders = sorted({local.resolve().parent for s in sources if (local := locate(s.uri).path) is not None})
    top = [f for f in folders if not any(f != other and f.is_relative_to(other) for other in folders)]
    return {"ITSD_INPUT_ROOTS": os.pathsep.join(map(str, top)), "ITSD_OUTPUT_ROOTS": str(out.resolve())}


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the workers and Redis are stopped either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command()
@click.argument("inputs", metavar="INPUTS...", nargs=-1, required=True)
@instruction_option
@click.option(
    "--out", "-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for outputs."
)
@model_option
@click.option("--workers", "-w", type=click.IntRange(1, 64), default=1, show_default=True, help="Local workers.")
@click.option(
    "--broker",
    metavar="URL",
    envvar="ITSD_RUN_BROKER_URL",
    callback=no_password_on_argv,
    help="Use this Redis instead of a private one; one with a password only through the env (argv is public). "
    "[env: ITSD_RUN_BROKER_URL, not ITSD_BROKER_URL]",
)
@edit_options
@runtime_options
@tile_batch_option
@click.option("--overwrite", is_flag=True, help="Recompute images whose output exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def run(
    inputs: tuple[str, ...],
    instruction: str | None,
    out: Path,
    model: str,
    workers: int,
    broker: str | None,
    params: EditParams,
    runtime: str,
    precision: str,
    tile_batch: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Edit INPUTS... (files, folders, globs, manifests) on this machine: start Redis and workers, run
    the batch with a progress bar, stop everything. Outputs mirror the inputs under OUT, with a summary
    (itsd-run.json) and a before/after contact sheet (itsd-contact-sheet.jpg). A symlink is followed; what it
    names must lie under the folder it was found in (a folder given, or a named file's own), else it fails alone."""
    say = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    settings = Settings.from_env()
    start = time.perf_counter()
    try:
        sources, rejected = collect_sources(list(inputs), (instruction or "").strip(), params, settings.access)
        if any(not s.instruction for s in sources):
            raise missing_instruction(instruction)
        if not sources and not rejected:
            raise click.ClickException(f"no images found in {' '.join(inputs)}")
        check_destination([InputFile(Path(s.uri), s.relative) for s in sources if locate(s.uri).path], out)
        artifacts = artifacts_for(model, settings, say)
        manifest = Manifest.read(artifacts)
        info = {
            "instruction": instruction or "(per manifest row)",
            "model": model,
            "model_id": manifest.model_id,
            "loras": [asdict(lora) for lora in manifest.loras],
            "params": params.resolve(manifest.edit_defaults).to_dict(),  # manifest rows may override
            "workers": workers,
            "tile_batch": tile_batch,
            "runtime_asked": f"{runtime} {precision}",
        }
        if not overwrite and all(Path(output_of(s, out)).exists() for s in sources):
            sys.exit(nothing_to_do(sources, rejected, out, info, start, say))
        name = f"run-{manifest.model_id}"
        with ExitStack() as stack, stop_on_sigterm():
            if not broker:
                say("starting a private Redis")
            url = check_broker_url(broker) if broker else stack.enter_context(RedisServer()).url
            connection = Broker(url, settings)
            env = {"ITSD_TILE_BATCH": str(tile_batch), "ITSD_RUNTIME": runtime, "ITSD_PRECISION": precision}
            started = time.perf_counter()
            local = start_workers(stack, url, {name: str(artifacts)}, workers, {**env, **local_roots(sources, out)})
            identity = ", ".join(filter(None, (manifest.model_id, manifest.lora_summary)))
            say(
                f"started {workers} worker(s) for {model} ({identity}); each loads the model and runs a warm-up "
                "edit before it takes a job (OpenVINO compiles each graph on first use, then caches it)"
            )
            wait_registered(connection.client, [name], local)
            say(
                f"the model passed its warm-up in {time.perf_counter() - started:.1f} s; the workers' pool "
                "processes load it once more, then the first images start"
            )
            submission = submit_batch(connection, sources, rejected, str(out.resolve()), name, overwrite=overwrite)
            say(f"batch {submission.batch_id}: {submission.queued} queued, {submission.finished} already done")
            counts = wait_for(connection, submission.batch_id, quiet, supervise=Supervisor(local))
            info |= {"batch_id": submission.batch_id, "total": submission.total, "counts": counts}
            report_run(connection, sources, out, info, start)
    except KeyboardInterrupt:
        click.echo("interrupted: workers and Redis stopped; run the same command again to resume", err=True)
        sys.exit(130)
    if counts["failed"]:
        sys.exit(1)


def start_workers(
    stack: ExitStack, url: str, models: dict[str, str], count: int, env: dict[str, str]
) -> list[LocalWorker]:
    """`count` local worker processes serving `models`, logging into a scratch folder; `stack` stops them."""
    logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="itsd-run-")))
    local = [LocalWorker(url, models, f"local{i}", logs / f"worker{i}.log", extra_env=env) for i in range(count)]
    for worker in local:
        stack.callback(worker.stop)
        worker.start()
    return local


def report_run(connection: Broker, sources: list[BatchInput], out: Path, info: dict[str, Any], start: float) -> None:
    """Write the run's record and contact sheet into OUT (every image of the batch, made now or before); say
    where, and name the failures."""
    record_and_say(sources, list(results(connection.client, info["batch_id"])), out, info, start)
    if info["counts"]["failed"]:
        echo_failures(connection, info["batch_id"])


def nothing_to_do(
    sources: list[BatchInput], rejected: list[Rejected], out: Path, info: dict[str, Any], start: float, say: Say
) -> int:
    """Every output is there already: start no Redis and no workers, bring the record and sheet up to date, name
    the inputs refused. Returns the exit status."""
    say(f"nothing to do: every output is in {out} already (--overwrite computes them again); no Redis or workers")
    refused = refusals(rejected)
    counts = {"done": 0, "skipped": len(sources), "failed": len(refused), "cancelled": 0}
    record_and_say(
        sources, refused, out, info | {"batch_id": None, "total": len(sources) + len(refused), "counts": counts}, start
    )
    for failure in refused:
        click.echo(f"  failed {failure.error_type}: {failure.error_message}", err=True)
    return 1 if refused else 0


def record_and_say(
    sources: list[BatchInput], found: list[Result], out: Path, info: dict[str, Any], start: float
) -> None:
    """Write the record (producer.record) with this run's results and time, and say how it went and where."""
    seconds = time.perf_counter() - start
    timed = info | {"seconds": round(seconds, 2), "images_per_s": round(info["counts"]["done"] / seconds, 3)}
    summary = write_record(sources, found, out, timed)
    click.echo(f"{describe(info['counts'], info['total'])} in {seconds:.1f} s; outputs in {out}")
    if summary["contact_sheet"]:
        click.echo(f"contact sheet: {summary['contact_sheet']}")
