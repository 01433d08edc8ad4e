"""The queue contract between producer and worker: the task's name, queue names, the Celery settings
both sides must agree on, and where batch records live in Redis. Plain data: neither side imports the
other, and this module imports no Celery.
"""

from __future__ import annotations

import json
import re
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from core.errors import BrokerAuthError, BrokerUnreachable, InvalidParameters
from core.job import FINAL_STATUSES
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


def check_broker_url(url: str | None) -> str:
    if not url:
        raise InvalidParameters("no broker: pass --broker redis://[:PASSWORD@]HOST:PORT/DB or set ITSD_BROKER_URL")
    if urlsplit(url).scheme not in ("redis", "rediss"):
        raise InvalidParameters(f"broker URL must start with redis:// or rediss://, got {redact(url)}")
    return url


def check_connection(url: str, timeout: float) -> None:
    """One PING within `timeout` seconds, or a BrokerUnreachable saying why in one line (never the password):
    so a wrong password or a closed port is an error in seconds, not a minute of retries or a silent hang."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    where = redact(url)
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError) as exc:
        if urlsplit(url).password is None and "auth" in str(exc).lower():  # NOAUTH, or HELLO without AUTH
            raise BrokerAuthError(
                f"Redis at {where} needs a password: put it in the URL, redis://:PASSWORD@HOST:PORT/DB"
            ) from None
        if isinstance(exc, redis.exceptions.AuthenticationError) or "WRONGPASS" in str(exc):
            raise BrokerAuthError(f"Redis at {where} refused the password") from None
        raise BrokerUnreachable(f"Redis at {where}: {str(exc).splitlines()[0]}") from None
    except redis.exceptions.TimeoutError:
        raise BrokerUnreachable(
            f"Redis at {where} did not answer within {timeout:g} s (ITSD_CONNECT_TIMEOUT)"
        ) from None
    except redis.exceptions.ConnectionError as exc:
        raise BrokerUnreachable(f"cannot connect to Redis at {where}: {str(exc).splitlines()[0]}") from None
    finally:
        client.close()


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def tls_options(url: str) -> dict[str, Any] | None:
    """TLS settings for Celery from a rediss:// URL's query (redis-py reads the same query itself):
    `ssl_cert_reqs=required|optional|none` (default required: certificates are checked), and
    `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` paths. None for plain redis://."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in _CERT_REQS:
        raise InvalidParameters(f"ssl_cert_reqs must be required, optional or none, got {query['ssl_cert_reqs']!r}")
    return {"ssl_cert_reqs": _CERT_REQS[reqs], **{key: query[key] for key in _TLS_FILES if key in query}}


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


def redis_client(url: str) -> Any:
    """A redis-py client for itsd's own records that rides out a Redis restart (retries with backoff for
    about a minute). redis is imported here, not at module level: core stays free of it."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_keepalive=True,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=4.0, base=0.25), retries=20),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


class Keys:
    """Redis keys of itsd's own records (Celery keeps its messages under its own names)."""

    models = "itsd:models"  # hash: model name -> JSON {model_id, artifacts, worker}, written by workers
    dead = "itsd:dead"  # list of JSON {job, error_type, error_message, attempts, worker, at}
    batches = "itsd:batches"  # sorted set: batch id by creation time
    workers = "itsd:workers"  # hash: worker name -> JSON {models, device, slots, host, pid, seen_at} (heartbeat)

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        self.batch = f"itsd:batch:{batch_id}"  # hash: the batch record (see producer.batch)
        self.jobs = f"{self.batch}:jobs"  # hash: job id -> job JSON (inline bytes left out)
        self.results = f"{self.batch}:results"  # hash: job id -> result JSON, once final
        self.outputs = f"{self.batch}:outputs"  # hash: job id -> base64 output, for inline jobs
        self.attempts = f"{self.batch}:attempts"  # hash: job id -> deliveries so far
        self.statuses = f"{self.batch}:statuses"  # hash: job id -> final status; the counts follow it
        self.by_worker = f"{self.batch}:workers"  # hash: worker -> jobs it recorded done (for live rates)
        self.failures = f"{self.batch}:failures"  # list: the latest failed results' JSON, newest first, capped

    @staticmethod
    def claim(job_id: str) -> str:
        return f"itsd:claim:{job_id}"  # string: the worker running the job, with a TTL it renews

    def all(self) -> tuple[str, ...]:
        return (
            self.batch,
            self.jobs,
            self.results,
            self.outputs,
            self.attempts,
            self.statuses,
            self.by_worker,
            self.failures,
        )


# Results and the per-status counts in the batch record change together, atomically, so progress is
# one HMGET however large the batch; so do the per-worker done counts and the latest failures, so a live
# view (`itsd status --watch`) reads a few small keys, never the results. KEYS: batch, results, statuses,
# by_worker, failures; ARGV: job id, status, result JSON, first ("1": keep an existing result), expiry
# seconds, worker.
FAILURES_KEPT = 20
_RECORD = f"""
if ARGV[4] == '1' and redis.call('hexists', KEYS[3], ARGV[1]) == 1 then return 0 end
local old = redis.call('hget', KEYS[3], ARGV[1])
if old then redis.call('hincrby', KEYS[1], 'n_' .. old, -1) end
redis.call('hincrby', KEYS[1], 'n_' .. ARGV[2], 1)
redis.call('hset', KEYS[3], ARGV[1], ARGV[2])
redis.call('hset', KEYS[2], ARGV[1], ARGV[3])
if ARGV[2] == 'done' and old ~= 'done' then redis.call('hincrby', KEYS[4], ARGV[6], 1) end
if ARGV[2] == 'failed' then
  redis.call('lpush', KEYS[5], ARGV[3])
  redis.call('ltrim', KEYS[5], 0, {FAILURES_KEPT - 1})
end
for i = 1, 5 do redis.call('expire', KEYS[i], ARGV[5]) end
return 1
"""
# KEYS: batch, results, statuses, outputs; ARGV: job ids whose results are dropped (to run them again)
_FORGET = """
for _, id in ipairs(ARGV) do
  local old = redis.call('hget', KEYS[3], id)
  if old then redis.call('hincrby', KEYS[1], 'n_' .. old, -1) end
  redis.call('hdel', KEYS[3], id)
  redis.call('hdel', KEYS[2], id)
  redis.call('hdel', KEYS[4], id)
end
return #ARGV
"""


def record_result(client: Any, keys: Keys, result: dict[str, Any], expires: int, first: bool = False) -> bool:
    """Store a final result in its batch and update the counts; `first` keeps a result already there
    (a skipped redelivery never hides the done result). True when stored."""
    args = (result["job_id"], result["status"], json.dumps(result), "1" if first else "0", expires)
    stored = client.eval(
        _RECORD,
        5,
        keys.batch,
        keys.results,
        keys.statuses,
        keys.by_worker,
        keys.failures,
        *args,
        result.get("worker") or "?",
    )
    return bool(stored)


def forget_results(client: Any, keys: Keys, job_ids: list[str]) -> None:
    for start in range(0, len(job_ids), 1000):
        chunk = job_ids[start : start + 1000]
        client.eval(_FORGET, 4, keys.batch, keys.results, keys.statuses, keys.outputs, *chunk)


def status_counts(client: Any, keys: Keys) -> dict[str, int]:
    values = client.hmget(keys.batch, [f"n_{status}" for status in FINAL_STATUSES])
    return {status: int(value or 0) for status, value in zip(FINAL_STATUSES, values, strict=True)}
