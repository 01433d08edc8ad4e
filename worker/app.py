"""The Celery app of a worker: the shared queue settings, the `itsd.edit` task, and model loading in
each pool process after the fork (ONNX Runtime sessions are not fork-safe), with a warm-up edit."""

from __future__ import annotations

import base64
import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import task_rejected, worker_init, worker_process_init

from core.errors import SchemaError, TransientError
from core.queue import TASK_NAME, celery_config
from core.records import dead_letter
from core.redis_url import redis_client
from core.settings import Settings
from worker.batching import HandedBack
from worker.jobs import EditService, ModelSpec
from worker.metrics import WorkerMetrics
from worker.transport import RAW_LIMIT

log = logging.getLogger(__name__)


def backoff(retries: int) -> float:
    """Seconds before retry number `retries + 1`: 1, 2, 4, ... capped at a minute."""
    return float(min(60, 2**retries))


def dead_letter_refused(sender: Any, message: Any, exc: BaseException | None, **_: Any) -> None:
    """Celery's `task_rejected`: a message it refused before any task ran (content it does not accept, such as
    pickle, or no task message at all) goes to the dead-letter list with the reason, as a malformed job does.
    Its body is kept as base64, never decoded."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    job = {
        "task_id": headers.get("id"),
        "task": headers.get("task"),
        "content_type": message.content_type,
        "raw_base64": base64.b64encode(body[:RAW_LIMIT]).decode(),
    }
    reason = f"message refused: {exc}" if exc is not None else "message refused: not a task message"
    dead_letter(redis_client(sender.app.conf.broker_url), job, SchemaError.code, reason, worker=sender.hostname)
    log.error("dead-lettered a refused message (task id %s): %s", job["task_id"], reason)


def make_app(
    url: str,
    settings: Settings,
    models: dict[str, ModelSpec],
    soft_shutdown_timeout: float = 30.0,
    metrics: WorkerMetrics | None = None,
) -> Celery:
    app = Celery("itsd", set_as_current=True)
    app.conf.update(celery_config(url, settings))
    app.conf.broker_transport = "worker.transport:Transport"  # a bad queue entry is dead-lettered, not fatal
    # SIGQUIT (or SIGTERM with REMAP_SIGTERM=SIGQUIT, as compose sets) lets running jobs finish for this
    # long, then requeues what is still running instead of losing it.
    app.conf.worker_soft_shutdown_timeout = soft_shutdown_timeout
    app.conf.worker_enable_soft_shutdown_on_idle = True
    # A pool process loads and warms up its models before it says it is up; billiard kills one that takes
    # longer than this (4 s by default: a large model on a CPU, or a TensorRT engine build, takes longer).
    app.conf.worker_proc_alive_timeout = settings.warm_up_timeout
    # --batch-jobs: jobs run as threads of one process, over one loaded model, their UNet calls batched
    app.conf.worker_pool = "worker.batching:ThreadPool" if settings.batch_jobs > 1 else "prefork"
    service = EditService(models, redis_client(url), settings, metrics)

    @app.task(name=TASK_NAME, bind=True)
    def edit(task: Task, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            return service.handle(payload, task.request.retries, task.request.hostname or "worker")
        except TransientError as exc:
            # Celery's own limit is ours: with its default (3) it re-raised before ITSD_MAX_RETRIES, and the job
            # was never recorded (the service records it failed and dead-letters it after the last attempt)
            retry = task.retry(exc=exc, countdown=backoff(task.request.retries), max_retries=settings.max_retries)
            raise retry from exc
        except HandedBack as exc:  # a batching worker's cold shutdown: the message goes back, unacknowledged
            raise Reject(str(exc), requeue=True) from exc

    task_rejected.connect(dead_letter_refused, weak=False, dispatch_uid="itsd-dead-letter-refused")

    def load_models(**_: Any) -> None:
        service.warm_up()

    # prefork and solo: in each pool process, after the fork; threads (--batch-jobs): once, in the worker
    (worker_init if settings.batch_jobs > 1 else worker_process_init).connect(load_models, weak=False)
    return app
