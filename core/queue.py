"""The queue contract between producer and worker: the task's name, queue names, and the Celery settings
both sides must agree on. Plain data: neither side imports the other, and this module imports no Celery.
Connections are `core.redis_url`'s; batch records, `core.records`'."""

from __future__ import annotations

import re
from typing import Any

from core.errors import InvalidParameters
from core.redis_url import tls_options
from core.settings import Settings

WORKER_HEARTBEAT_S = 15.0  # how often a worker renews its record in Keys.workers; 3 missed: shown as gone
TASK_NAME = "itsd.edit"  # the producer sends by name; the worker registers the task under it
QUEUE_PREFIX = "itsd."
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def queue_for(model: str) -> str:
    """One queue per model, so a worker consumes only the models it has loaded."""
    if not MODEL_NAME.match(model):
        raise InvalidParameters(f"model name {model!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return QUEUE_PREFIX + model


def celery_config(url: str, settings: Settings) -> dict[str, Any]:
    """Settings both sides load. Why each one:

    - JSON only: a pickle message could run code on the worker; Celery refuses content it does not accept.
    - acks late + reject on worker lost + prefetch 1: a job is acknowledged only when done, a killed pool
      child hands its job back at once, and no worker hoards jobs another could run.
    - the visibility timeout (broker and result backend both): above the longest job, or Redis hands a
      running job to a second worker.
    - connection retries forever: a Redis restart pauses the fleet instead of stopping it.
    """
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "socket_keepalive": True,
        "health_check_interval": 10,  # notice a restarted Redis within seconds
        "retry_on_timeout": True,
    }
    # Sweep for abandoned messages often enough for the timeout (kombu's default is ~100 s).
    transport["unacked_restore_interval"] = max(1, min(10, settings.visibility_timeout // 4))
    transport["unacked_restore_throttle"] = 1
    tls = tls_options(url)
    return {
        "broker_url": url,
        "result_backend": url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "result_expires": settings.result_expires,
        "result_extended": True,
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_use_ssl": tls,
        "redis_backend_use_ssl": tls,
        "task_track_started": True,
        "task_send_sent_event": settings.celery_events,  # Flower shows queued jobs
        "worker_send_task_events": settings.celery_events,
        "worker_hijack_root_logger": False,
    }
