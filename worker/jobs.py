"""What a worker does with one job: the body of the `itsd.edit` task, free of Celery so it reads top to
bottom and tests can call it directly.

For each delivery: count the attempt; a cancelled batch ends the job at once; otherwise take the job's
claim (waiting while a live worker holds it), skip it if its output exists by then, pin the batch to the
model this worker serves (or refuse the job if the batch is pinned to another), read the input, edit,
write the output atomically, and record a small JSON result in the batch. Permanent errors are
recorded as failures; transient ones propagate for the task to retry, until the last attempt, which
goes to the dead-letter list with its payload.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

from core.edit import Backend, Tiling, edit_image
from core.errors import (
    InvalidImage,
    InvalidModel,
    ItsdError,
    ModelMismatch,
    ModelUnavailable,
    OutOfMemory,
    OutsideRoots,
    PermanentError,
    SchemaError,
    TransientError,
)
from core.images import decode_image, encode_image
from core.job import Job, Result
from core.records import Keys, dead_letter, pin_model, record_result
from core.settings import Settings
from core.storage import read_uri, uri_exists, write_uri
from worker.batching import BatchedBackend, ThreadPool
from worker.claims import Claim
from worker.metrics import WorkerMetrics
from worker.warmup import describe, warm_up

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """A model a worker serves: its queue name, identity, and how to load it (after the fork)."""

    name: str
    model_id: str
    source: str  # the artifact folder, for the registry and logs
    load: Callable[[], Backend]


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self._last, 6)
        self._last = now


def _transient(exc: BaseException) -> TransientError | None:
    if isinstance(exc, TransientError):
        return exc
    if isinstance(exc, MemoryError):
        return OutOfMemory("out of memory")
    return None


class EditService:
    def __init__(
        self, models: dict[str, ModelSpec], client: Any, settings: Settings, metrics: WorkerMetrics | None = None
    ) -> None:
        self.models = models
        self.metrics = metrics  # None: no --metrics-port
        self.client = client
        self.settings = settings
        self._loaded: dict[str, Backend] = {}
        self.unavailable: dict[str, str] = {}  # model -> why its warm-up failed in this process
        self.tiling = Tiling(batch=settings.tile_batch)

    def backend(self, name: str) -> Backend:
        if name not in self._loaded:
            loaded = self.models[name].load()
            # jobs on threads of this process share UNet calls; the warm-up runs on the model itself
            batched = self.settings.batch_jobs > 1
            self._loaded[name] = BatchedBackend(loaded, stopping=ThreadPool.stopping) if batched else loaded
        return self._loaded[name]

    def warm_up(self) -> None:
        """Load and warm up every model in this process, so its first job pays no start-up cost. A model that
        fails here (the worker's probe passed, so: this process's share of a device, say) is unavailable in this
        process: its jobs are retried, and so go to other workers."""
        for name in self.models:
            start = time.perf_counter()
            try:
                warm_up(self.backend(name), self.tiling)
            except Exception as exc:
                self.unavailable[name] = describe(exc)
                log.error("model %s failed its warm-up in this process; its jobs go back to the queue: %s", name, exc)
                continue
            log.info("model %s ready (loaded and warmed up in %.1f s)", name, time.perf_counter() - start)
            if self.metrics is not None:
                self.metrics.served(name, self.models[name].model_id, getattr(self.backend(name), "label", None))
        if self.metrics is not None and len(self.unavailable) < len(self.models):
            self.metrics.ready.set(1)

    # --- the task body ---------------------------------------------------------------------------
    def handle(self, payload: dict[str, Any], retries: int, worker: str) -> dict[str, Any]:
        """Run one delivery; returns the result as JSON. Raises a TransientError to ask for a retry."""
        started = time.time()
        try:
            job = Job.from_dict(payload)
        except (ItsdError, TypeError, KeyError) as exc:
            return self._malformed(payload, exc, worker)
        keys = Keys(job.batch_id)
        attempts = int(self.client.hincrby(keys.attempts, job.job_id, 1))
        base = Result(
            job.job_id, "failed", output_uri=job.output_uri, worker=worker, attempts=attempts, started_at=started
        )
        if self.client.hget(keys.batch, "cancelled") == b"1":
            return self._record(keys, replace(base, status="cancelled", finished_at=time.time()), job.model, first=True)
        try:  # before anything is read, written or even looked at
            self._check_access(job)
        except OutsideRoots as exc:
            failed = replace(base, error_type=exc.code, error_message=str(exc), finished_at=time.time())
            return self._record(keys, failed, job.model)
        claim = Claim(self.client, job.job_id, self.settings.claim_ttl)
        if not claim.acquire(lambda: self._done(job, keys)):
            return self._record(keys, replace(base, status="skipped", finished_at=time.time()), job.model, first=True)
        with claim, self.metrics.running() if self.metrics is not None else nullcontext():
            try:
                result = self._edit(job, keys, base)
            except PermanentError as exc:
                result = replace(base, error_type=exc.code, error_message=str(exc), finished_at=time.time())
            except Exception as exc:
                transient = _transient(exc)
                if transient is None:
                    raise
                if retries < self.settings.max_retries:
                    log.warning("job %s: %s (attempt %d, will retry)", job.job_id, transient, attempts)
                    self._count(job.model, "retried")
                    raise transient from exc
                result = replace(base, error_type=transient.code, error_message=str(transient), finished_at=time.time())
                self._dead_letter(job.to_dict(), result)
                self._count(job.model, "dead")
        return self._record(keys, result, job.model)

    def _edit(self, job: Job, keys: Keys, base: Result) -> Result:
        if job.model not in self.models:
            raise InvalidModel(f"this worker does not serve model {job.model!r} (it serves {', '.join(self.models)})")
        if job.model in self.unavailable:
            reason = self.unavailable[job.model]
            raise ModelUnavailable(f"model {job.model} failed its warm-up on this worker: {reason}")
        spec = self.models[job.model]
        pinned = pin_model(self.client, keys, spec.model_id)
        if pinned != spec.model_id:
            raise ModelMismatch(
                f"batch pinned to model {job.model} {pinned}; this worker serves {spec.model_id} under that name"
                " (resubmit with --overwrite to recompute the batch with it)"
            )
        watch = Stopwatch()
        data = self._read_input(job)
        watch.lap("read")
        image = decode_image(data, self.settings.max_pixels)
        watch.lap("decode")
        backend = self.backend(job.model)
        with backend.job() if isinstance(backend, BatchedBackend) else nullcontext():
            before = dict(getattr(backend, "timings", {}))
            edit = edit_image(backend, image, job.instruction, job.params, self.tiling)
        watch.lap("edit")
        for stage, seconds in getattr(backend, "timings", {}).items():
            watch.timings[f"edit.{stage}"] = round(seconds - before.get(stage, 0.0), 6)
        name = job.relative or (job.output_uri or "output.png").rsplit("/", 1)[-1]
        encoded = encode_image(edit.image, name, source=image, keep=job.params.metadata)
        watch.lap("encode")
        if job.output_uri is None:
            self.client.hset(keys.outputs, job.job_id, base64.b64encode(encoded))
            self.client.expire(keys.outputs, self.settings.result_expires)
        else:
            write_uri(job.output_uri, encoded)
        watch.lap("write")
        width, height = edit.image.size
        return replace(
            base,
            status="done",
            width=width,
            height=height,
            size_bytes=len(encoded),
            seed=edit.seed,
            working_width=edit.working_size[0],
            working_height=edit.working_size[1],
            tiles=edit.tiles,
            runtime=getattr(backend, "label", None),
            model_id=spec.model_id,
            batched_jobs=backend.shared if isinstance(backend, BatchedBackend) else None,
            timings=watch.timings,
            finished_at=time.time(),
        )

    def _check_access(self, job: Job) -> None:
        access = self.settings.access
        if job.input_uri is not None:
            access.check_input(job.input_uri)
        if job.output_uri is not None:
            access.check_output(job.output_uri)

    def _read_input(self, job: Job) -> bytes:
        if job.input_b64 is not None:
            try:
                return base64.b64decode(job.input_b64, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidImage("inline input is not valid base64") from None
        if job.input_uri is None:
            raise SchemaError("job has neither input_uri nor input_b64")
        return read_uri(job.input_uri, self.settings.max_input_bytes)

    def _done(self, job: Job, keys: Keys) -> bool:
        """Whether there is nothing left to do: the output exists (or, with overwrite, this batch has
        recorded the job as done; resubmitting with --overwrite clears that record)."""
        if job.overwrite:
            return self.client.hget(keys.statuses, job.job_id) == b"done"
        if job.output_uri is None:
            return bool(self.client.hexists(keys.outputs, job.job_id))
        return uri_exists(job.output_uri)

    def _record(self, keys: Keys, result: Result, model: str, first: bool = False) -> dict[str, Any]:
        data = result.to_dict()
        record_result(self.client, keys, data, self.settings.result_expires, first)
        if self.metrics is not None:
            self.metrics.ended(model, result)
        log.info(
            "job %s %s%s", result.job_id, result.status, f": {result.error_message}" if result.error_message else ""
        )
        return data

    def _count(self, model: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.attempt(model, outcome)

    def _dead_letter(self, payload: dict[str, Any], result: Result) -> None:
        dead_letter(self.client, payload, result.error_type, result.error_message, result.attempts, result.worker)

    def _malformed(self, payload: dict[str, Any], exc: BaseException, worker: str) -> dict[str, Any]:
        job_id = str(payload.get("job_id", "?")) if isinstance(payload, dict) else "?"
        result = Result(
            job_id,
            "failed",
            worker=worker,
            error_type=SchemaError.code,
            error_message=str(exc),
            finished_at=time.time(),
        )
        log.error("refused a malformed job %s: %s", job_id, exc)
        self._dead_letter(payload if isinstance(payload, dict) else {"raw": repr(payload)}, result)
        self._count("?", "dead")
        return result.to_dict()
