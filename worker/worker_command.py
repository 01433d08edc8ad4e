"""`itsd worker`: serve one or more exported models from their queues (`itsd.<name>`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from core.access import parse_roots
from core.errors import BrokerAuthError, BrokerUnreachable
from core.queue import queue_for
from core.redis_url import check_broker_url, check_connection
from core.settings import Settings
from producer.options import broker_url_option, runtime_options, tile_batch_option
from worker.jobs import ModelSpec
from worker.serving import onnx_model, serve

log = logging.getLogger(__name__)


def parse_models(
    values: tuple[str, ...], device: str, runtime: str = "auto", precision: str = "auto"
) -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise click.BadParameter(f"{value!r}: use NAME=ARTIFACTS", param_hint="--model")
        queue_for(name)  # validates the name
        if name in models:
            raise click.BadParameter(f"model {name!r} given twice", param_hint="--model")
        models[name] = onnx_model(name, folder, device, runtime, precision)
    return models


def _root_option(kind: str, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        f"--{kind}-root",
        f"{kind}_roots",
        multiple=True,
        type=click.Path(file_okay=False, path_type=Path),
        help=f"{what}; repeatable. [env: ITSD_{kind.upper()}_ROOTS, colon-separated]",
    )


@click.command()
@click.option(
    "--model",
    "-m",
    "model_specs",
    multiple=True,
    required=True,
    metavar="NAME=ARTIFACTS",
    help="A model to serve from queue itsd.NAME: an artifact folder from `itsd export`. Repeatable.",
)
@broker_url_option
@click.option("--device", default="auto", show_default=True, help="auto (ITSD_PROVIDERS order), cpu, or cuda:N.")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Pool processes, each with its own sessions (one per GPU is usual).",
)
@click.option(
    "--hostname",
    "-n",
    help="Worker name shown in results, `itsd workers` and Flower; %h (host), %n (its first label) and %d (its "
    "domain) expand as in Celery. [default: itsd@%h]",
)
@click.option(
    "--soft-shutdown-timeout",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="On SIGQUIT, seconds running jobs get to finish before they are handed back to the queue.",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Worker log level.")
@click.option(
    "--batch-jobs",
    type=click.IntRange(1, 64),
    envvar="ITSD_BATCH_JOBS",
    default=1,
    show_default=True,
    help="Jobs run at once in one process, their UNet calls batched together (the throughput lever on GPUs); "
    "with more than 1, --concurrency must be 1. [env: ITSD_BATCH_JOBS]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="ITSD_METRICS_PORT",
    help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics and readiness on /ready (200 once the "
    "models are loaded and warmed up). [env: ITSD_METRICS_PORT]",
)
@runtime_options
@tile_batch_option
@_root_option("input", "A folder local inputs may be read from")
@_root_option("output", "A folder outputs may be written under")
def worker(
    model_specs: tuple[str, ...],
    broker: str | None,
    device: str,
    concurrency: int,
    hostname: str | None,
    soft_shutdown_timeout: float,
    loglevel: str,
    batch_jobs: int,
    metrics_port: int | None,
    runtime: str,
    precision: str,
    tile_batch: int,
    input_roots: tuple[Path, ...],
    output_roots: tuple[Path, ...],
) -> None:
    """Run a Celery worker that edits images with ONNX Runtime. Sessions load once per pool process,
    after the fork, with a warm-up edit; SIGTERM finishes running jobs, then stops."""
    if batch_jobs > 1 and concurrency > 1:
        raise click.BadParameter(
            "batched jobs share one process; run more workers (or --batch-jobs 1) for more processes",
            param_hint="--concurrency with --batch-jobs",
        )
    try:
        url = check_broker_url(broker)
        models = parse_models(model_specs, device, runtime, precision)
        settings = Settings.from_env()
        access = replace(
            settings.access,
            input_roots=parse_roots(os.pathsep.join(map(str, input_roots))) or settings.access.input_roots,
            output_roots=parse_roots(os.pathsep.join(map(str, output_roots))) or settings.access.output_roots,
        )
        settings = replace(settings, tile_batch=tile_batch, batch_jobs=batch_jobs, access=access)
        check_connection(url, settings.connect_timeout)
    except BrokerUnreachable as exc:
        if isinstance(exc, BrokerAuthError):  # a wrong or missing password: say so, do not hang
            raise
        log.warning("%s; waiting for it (workers start before Redis is up, and ride out its restarts)", exc)
    serve(url, models, concurrency, hostname, soft_shutdown_timeout, loglevel, settings, metrics_port, device)
