"""`itsd worker`: serve one or more exported models from their queues (`itsd.<name>`)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from core.access import parse_roots
from core.edit import Backend, Tiling
from core.errors import BrokerAuthError, BrokerUnreachable, WarmUpFailed
from core.manifest import Manifest
from core.queue import queue_for
from core.redis_url import check_broker_url, check_connection, redact
from core.settings import Settings
from producer.options import broker_url_option, runtime_options, tile_batch_option
from worker.jobs import ModelSpec
from worker.registry import WorkerRecord, register
from worker.runtimes import check_choice
from worker.warmup import probe

log = logging.getLogger(__name__)


def parse_device(device: str) -> tuple[tuple[str, ...] | None, int]:
    """`auto` (the ITSD_PROVIDERS order), `cpu`, or `cuda:N` -> (providers, device id)."""
    if device == "auto":
        return None, 0
    if device == "cpu":
        return ("CPUExecutionProvider",), 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index or "0").isdigit():
        return ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), int(index or 0)
    raise click.BadParameter(f"{device!r}: use auto, cpu or cuda:N", param_hint="--device")


def onnx_model(name: str, folder: str, device: str, runtime: str = "auto", precision: str = "auto") -> ModelSpec:
    """A served artifact folder: checked now (a bad folder stops the worker before it takes jobs),
    loaded in each pool process later, on its runtime and precision."""
    manifest = Manifest.read(Path(folder))
    providers, device_id = parse_device(device)
    check_choice(runtime, precision, providers or Settings.from_env().providers)  # a bad pair stops the worker now

    def load() -> Backend:
        from worker.runtimes import load_artifacts

        return load_artifacts(Path(folder), runtime, precision, providers, device_id)

    return ModelSpec(name, manifest.model_id, str(Path(folder).resolve()), load)


def serve(
    url: str,
    models: dict[str, ModelSpec],
    concurrency: int = 1,
    hostname: str | None = None,
    soft_shutdown_timeout: float = 30.0,
    loglevel: str = "INFO",
    settings: Settings | None = None,
    metrics_port: int | None = None,
    device: str = "auto",
) -> None:
    """Warm each model up, register those that passed, and run a Celery worker on their queues until it is
    told to stop (with `/metrics` and `/ready` on `metrics_port`). Raises WarmUpFailed if no model passed."""
    from worker.app import make_app

    settings = settings or Settings.from_env()
    hostname = hostname or f"itsd-{socket.gethostname()}"
    missing = [kind for kind in ("input", "output") if not getattr(settings.access, f"{kind}_roots")]
    if missing:
        log.warning(
            "no %s roots: this worker refuses every job with a local %s path; declare them with ITSD_INPUT_ROOTS / "
            "ITSD_OUTPUT_ROOTS (colon-separated) or --input-root / --output-root",
            " or ".join(missing),
            " or ".join(missing),
        )
    with ExitStack() as stack:
        metrics = None
        if metrics_port is not None:  # up during the warm-up (/ready says 503), and before the fork: the pool
            from worker.metrics import MetricsServer, WorkerMetrics, enable  # processes inherit the metrics

            server = MetricsServer(enable(), metrics_port).start()
            stack.callback(server.close)
            metrics = WorkerMetrics()
            log.info("metrics on http://0.0.0.0:%d/metrics, readiness on /ready", server.port)
        failures, labels = probe(models, Tiling(batch=settings.tile_batch), settings.warm_up_timeout)
        for name, reason in failures.items():
            log.error("model %s failed its warm-up, so this worker does not serve it: %s", name, reason)
        models = {name: spec for name, spec in models.items() if name not in failures}
        if not models:
            raise WarmUpFailed("no model passed its warm-up: " + "; ".join(f"{n}: {r}" for n, r in failures.items()))
        register(url, models, hostname)
        served = {name: {"model_id": spec.model_id, "runtime": labels.get(name)} for name, spec in models.items()}
        slots = {"concurrency": concurrency, "batch_jobs": settings.batch_jobs, "metrics_port": metrics_port}
        stack.callback(WorkerRecord(url, hostname, {"models": served, "device": device, **slots}).start().close)
        app = make_app(url, settings, models, soft_shutdown_timeout, metrics)
        queues = ",".join(queue_for(name) for name in models)
        log.info("serving %s on %s from %s", ", ".join(models), queues, redact(url))
        # --batch-jobs: that many jobs at once, as threads over one loaded model (the pool is worker_pool, set
        # by make_app: the -P option takes only Celery's own names), their UNet calls batched
        concurrency = settings.batch_jobs if settings.batch_jobs > 1 else concurrency
        app.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "-n", hostname, "-l", loglevel])


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
@click.option("--hostname", "-n", help="Worker name shown in results and Flower. [default: itsd-HOST]")
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
            raise click.ClickException(str(exc)) from None
        log.warning("%s; waiting for it (workers start before Redis is up, and ride out its restarts)", exc)
    serve(url, models, concurrency, hostname, soft_shutdown_timeout, loglevel, settings, metrics_port, device)
