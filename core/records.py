"""Where batch records live in Redis (`Keys`), and the scripts that change them atomically (`core/lua/`):
recording a result with the batch's counts, forgetting results to run their jobs again, pinning a batch to
the model identity that runs it. Celery keeps its messages under its own names; these are itsd's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from core.job import FINAL_STATUSES

_LUA = Path(__file__).parent / "lua"
_RECORD = (_LUA / "record.lua").read_text()
_FORGET = (_LUA / "forget.lua").read_text()
_PIN = (_LUA / "pin.lua").read_text()
PIN = "model_id"  # the batch record's field: the identity of the model its jobs are made with, once pinned


class Keys:
    """Redis keys of itsd's own records (Celery keeps its messages under its own names)."""

    models = "itsd:models"  # hash: model name -> JSON {model_id, source, worker, at}, the last worker to start
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
        self.queued = f"{self.batch}:queued"  # hash: job id -> when the producer last sent its message
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
            self.queued,
            self.statuses,
            self.by_worker,
            self.failures,
        )


FAILURES_KEPT = 20  # the latest failed results a batch keeps for live views


def dead_letter(
    client: Any,
    job: dict[str, Any],
    error_type: str | None,
    error_message: str | None,
    attempts: int = 0,
    worker: str | None = None,
) -> None:
    """Add an entry to the dead-letter list (`Keys.dead`): a job's payload, or what is known of a message that
    was no job, with the reason."""
    entry = {
        "job": job,
        "error_type": error_type,
        "error_message": error_message,
        "attempts": attempts,
        "worker": worker,
        "at": time.time(),
    }
    client.lpush(Keys.dead, json.dumps(entry))


def record_result(client: Any, keys: Keys, result: dict[str, Any], expires: int, first: bool = False) -> bool:
    """Store a final result in its batch and update the counts, the per-worker done counts and the latest
    failures with it (`lua/record.lua`); `first` keeps a result already there (a skipped redelivery never
    hides the done result). True when stored."""
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
        FAILURES_KEPT,
    )
    return bool(stored)


def forget_results(client: Any, keys: Keys, job_ids: list[str]) -> None:
    for start in range(0, len(job_ids), 1000):
        chunk = job_ids[start : start + 1000]
        client.eval(_FORGET, 4, keys.batch, keys.results, keys.statuses, keys.outputs, *chunk)


def pin_model(client: Any, keys: Keys, model_id: str) -> str:
    """The identity the batch is pinned to: `model_id` if the batch had none (`lua/pin.lua`), else the first's."""
    pinned = client.eval(_PIN, 1, keys.batch, PIN, model_id)
    return pinned.decode() if isinstance(pinned, bytes) else pinned


def status_counts(client: Any, keys: Keys) -> dict[str, int]:
    values = client.hmget(keys.batch, [f"n_{status}" for status in FINAL_STATUSES])
    return {status: int(value or 0) for status, value in zip(FINAL_STATUSES, values, strict=True)}
