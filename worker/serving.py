"""Run a worker: `onnx_model` checks an artifact folder and says how to load it; `serve` warms the models up,
registers them and runs the Celery worker on their queues. `itsd worker` (worker.worker_command) is the command."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from celery.utils.nodenames import default_nodename, host_format

from core.edit import Backend, Tiling
from core.errors import InvalidParameters, WarmUpFailed
from core.manifest import Manifest
from core.queue import queue_for
from core.redis_url import redact
from core.settings import Settings
from worker.jobs import ModelSpec
from worker.registry import WorkerRecord, register
from worker.runtimes import check_choice
from worker.warmup import probe

log = logging.getLogger(__name__)
DEFAULT_HOSTNAME = "itsd@%h"  # --hostname's default: itsd@ and this host's name


def parse_device(device: str) -> tuple[tuple[str, ...] | None, int]:
    """`auto` (the ITSD_PROVIDERS order), `cpu`, or `cuda:N` -> (providers, device id)."""
    if device == "auto":
        return None, 0
    if device == "cpu":
        return ("CPUExecutionProvider",), 0
    kind, _, index = device.partition(":")
    if kind == "cuda" and (index or "0").isdigit():
        return ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), int(index or 0)
    raise InvalidParameters(f"--device {device!r}: use auto, cpu or cuda:N")


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
    # expanded as Celery expands -n (%h, %n, %d; a bare name gets `celery@`), so `itsd workers` and the results
    # (`itsd status`) name a worker alike
    hostname = host_format(default_nodename(hostname or DEFAULT_HOSTNAME))
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
        queues = [queue_for(name) for name in models]
        record = WorkerRecord(url, hostname, {"models": served, "device": device, **slots}, queues, settings.claim_ttl)
        stack.callback(record.start().close)
        app = make_app(url, settings, models, soft_shutdown_timeout, metrics)
        log.info("serving %s on %s from %s", ", ".join(models), ",".join(queues), redact(url))
        # --batch-jobs: that many jobs at once, as threads over one loaded model (the pool is worker_pool, set
        # by make_app: the -P option takes only Celery's own names), their UNet calls batched
        concurrency = settings.batch_jobs if settings.batch_jobs > 1 else concurrency
        app.worker_main(["worker", "-Q", ",".join(queues), "-c", str(concurrency), "-n", hostname, "-l", loglevel])
