"""`itsd run`: the whole system on one machine. A private, password-protected Redis (unless --broker),
N local workers, one batch with a progress bar, then a clean shutdown (Ctrl-C and SIGTERM included),
a summary JSON and a before/after contact sheet.

`--model` takes an artifact folder, or a diffusers checkpoint (a folder, or a Hub id when online) that
is exported on first use and cached by its content hash under ITSD_CACHE_DIR.
"""

from __future__ import annotations

import json
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

from core.backends import detect
from core.errors import InvalidModel
from core.inputs import InputFile, check_destination
from core.job import Job, Result
from core.manifest import Manifest, checkpoint_hash
from core.params import EditParams
from core.records import Keys
from core.redis_url import check_broker_url
from core.settings import Settings
from core.storage import locate
from producer.batch import Broker, per_worker, results, submit_batch
from producer.local import LocalWorker, RedisServer, Supervisor, wait_registered
from producer.options import edit_options, no_password_on_argv, runtime_options, tile_batch_option
from producer.sheet import write_contact_sheet
from producer.sources import BatchInput, collect_sources
from producer.submit import describe, echo_failures, wait_for

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "itsd-tiny"
SUMMARY_NAME = "itsd-run.json"
SHEET_NAME = "itsd-contact-sheet.jpg"
SHEET_ROWS = 12


def artifacts_for(model: str, settings: Settings, report: Callable[[str], None]) -> Path:
    """An artifact folder for MODEL: itself, or its cached export (made now if missing)."""
    if detect(model) == "onnx":
        return Path(model)
    try:
        from export.checkpoint import resolve
        from export.exporter import export_checkpoint
    except ImportError as exc:
        raise InvalidModel(
            f"{model} is a checkpoint; exporting it needs {exc.name}: pip install 'itsd[export]'"
        ) from None
    folder = resolve(model)
    cached = settings.cache_dir / "exports" / f"{checkpoint_hash(folder)[:16]}-fp32"
    if (cached / "manifest.json").is_file():
        report(f"using the cached export of {model}: {cached}")
        return cached
    report(f"exporting {model} to {cached} (once; later runs reuse it)")
    export_checkpoint(model, cached, report=report)
    return cached


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


def _sheet_rows(client: Any, batch_id: str, found: list[Result]) -> list[tuple[Path, Path, str]]:
    done = sorted((r for r in found if r.status == "done"), key=lambda r: r.output_uri or "")
    rows = []
    for result in done[:SHEET_ROWS]:
        job = Job.from_dict(json.loads(client.hget(Keys(batch_id).jobs, result.job_id)))
        if job.input_uri and job.output_uri and locate(job.input_uri).path and locate(job.output_uri).path:
            rows.append((Path(job.input_uri), Path(job.output_uri), f"{job.relative}: {job.instruction}"))
    return rows


def summarise(broker: Broker, batch_id: str, out: Path, info: dict[str, Any]) -> dict[str, Any]:
    found = list(results(broker.client, batch_id))
    rows = _sheet_rows(broker.client, batch_id, found)
    if rows:
        write_contact_sheet(rows, out / SHEET_NAME)
    summary = {
        **info,
        "batch_id": batch_id,
        "per_worker": per_worker(found),
        "runtimes": sorted({r.runtime for r in found if r.runtime}),  # what the workers chose
        "images": [
            {
                "output": r.output_uri,
                "size": [r.width, r.height],
                "working_size": [r.working_width, r.working_height],
                "tiles": r.tiles,
            }
            for r in sorted(found, key=lambda r: r.output_uri or "")
            if r.status == "done"
        ],
        "failures": [
            {"job_id": r.job_id, "error_type": r.error_type, "error": r.error_message}
            for r in found
            if r.status == "failed"
        ],
        "contact_sheet": str(out / SHEET_NAME) if rows else None,
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@click.command()
@click.argument("inputs", metavar="INPUTS...", nargs=-1, required=True)
@click.option(
    "--instruction", "-i", default="", help='What to do, e.g. "Cartoonize the image"; a manifest row may give its own.'
)
@click.option(
    "--out", "-o", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for outputs."
)
@click.option(
    "--model",
    "-m",
    default=str(BUNDLED_MODEL),
    show_default="itsd-tiny, bundled",
    metavar="PATH",
    help="Artifact folder, or a diffusers checkpoint (folder or Hub id) exported on first use and cached.",
)
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
    instruction: str,
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
        sources, rejected = collect_sources(list(inputs), instruction.strip(), params, settings.access)
        if any(not s.instruction for s in sources):
            raise click.BadParameter("the instruction is empty", param_hint="--instruction")
        check_destination([InputFile(Path(s.uri), s.relative) for s in sources if locate(s.uri).path], out)
        artifacts = artifacts_for(model, settings, say)
        manifest = Manifest.read(artifacts)
        name = f"run-{manifest.model_id}"
        with ExitStack() as stack, stop_on_sigterm():
            url = check_broker_url(broker) if broker else stack.enter_context(RedisServer()).url
            connection = Broker(url, settings)
            env = {"ITSD_TILE_BATCH": str(tile_batch), "ITSD_RUNTIME": runtime, "ITSD_PRECISION": precision}
            local = start_workers(stack, url, {name: str(artifacts)}, workers, {**env, **local_roots(sources, out)})
            identity = ", ".join(filter(None, (manifest.model_id, manifest.lora_summary)))
            say(f"started {workers} worker(s) for {model} ({identity}); waiting for them to register it")
            wait_registered(connection.client, [name], local)
            submission = submit_batch(connection, sources, rejected, str(out.resolve()), name, overwrite=overwrite)
            say(f"batch {submission.batch_id}: {submission.queued} queued, {submission.finished} already done")
            counts = wait_for(connection, submission.batch_id, quiet, supervise=Supervisor(local))
            seconds = time.perf_counter() - start
            info = {
                "instruction": instruction or "(per manifest row)",
                "model": model,
                "model_id": manifest.model_id,
                "loras": [asdict(lora) for lora in manifest.loras],
                "params": params.resolve(manifest.edit_defaults).to_dict(),  # manifest rows may override
                "workers": workers,
                "tile_batch": tile_batch,
                "runtime_asked": f"{runtime} {precision}",
                "total": submission.total,
                "seconds": round(seconds, 2),
                "images_per_s": round(counts["done"] / seconds, 3),
                "counts": counts,
            }
            report_run(connection, submission.batch_id, out, info)
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


def report_run(connection: Broker, batch_id: str, out: Path, info: dict[str, Any]) -> None:
    """Write the run's summary and contact sheet into OUT; say where, and name the failures."""
    summary = summarise(connection, batch_id, out, info)
    counts = info["counts"]
    click.echo(f"{describe(counts, info['total'])} in {info['seconds']:.1f} s; outputs in {out}")
    if summary["contact_sheet"]:
        click.echo(f"contact sheet: {summary['contact_sheet']}")
    if counts["failed"]:
        echo_failures(connection, batch_id)
