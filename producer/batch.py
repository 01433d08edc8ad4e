"""Batches: turning sources into jobs, recording the batch in Redis, queueing what is not done yet,
and reading progress back. `itsd submit`, `status`, `collect`, `cancel` and `run` are thin over this.

The batch id is a hash of its job ids and destination, so submitting the same work again finds the
same batch: finished jobs are skipped, failed and cancelled ones are run again, those still queued or
running are left alone, and the rest (whose message was lost) are queued again.

Job ids need the model's name only, so a batch can be submitted before any worker has loaded the model; its
jobs wait in the queue. The first worker to run one pins the batch to the model identity it serves, and a
worker serving another refuses the batch's jobs (`worker.jobs`). A resubmit meets the pin here: once workers
have registered another identity under the name, the batch is refused, or with --overwrite unpinned and
recomputed, so a batch's results never mix two models.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery

from core.errors import InvalidParameters, ItsdError, ModelMismatch
from core.holds import hand_back, in_flight
from core.job import Job, Result, job_id_for
from core.queue import TASK_NAME, celery_config, queue_for
from core.records import PIN, Keys, forget_results, record_result, status_counts
from core.redis_url import check_connection, redis_client
from core.settings import Settings
from core.storage import join_uri, read_uri, uri_exists
from producer.sources import BatchInput, Rejected

READERS = 16  # inputs hashed in parallel (I/O bound: local disks and object stores alike)


class Broker:
    """The producer's two handles on one Redis: Celery to send tasks by name, redis-py for records."""

    def __init__(self, url: str, settings: Settings) -> None:
        check_connection(url, settings.connect_timeout)  # a wrong password or a closed port: one line, now
        self.url = url
        self.settings = settings
        self.client = redis_client(url)
        self.app = Celery("itsd-producer", set_as_current=False)
        self.app.conf.update(celery_config(url, settings))

    def registered(self, model: str) -> str | None:
        """The identity the last worker to start registered for `model`; None while no worker has served it."""
        queue_for(model)  # a name no queue can have is refused before anything is read
        entry = self.client.hget(Keys.models, model)
        return None if entry is None else json.loads(entry)["model_id"]


@dataclass(frozen=True)
class Submission:
    batch_id: str
    total: int
    queued: int  # sent to workers now
    finished: int  # already done or skipped before this submit
    failed: int  # refused at submit (unreadable input, bad manifest row)
    in_flight: int = 0  # queued or running since an earlier submit: not sent again


def _failure_id(where: str) -> str:
    return "x" + hashlib.sha256(where.encode()).hexdigest()[:31]


def _job_for(source: BatchInput, destination: str, model: str, inline: int, overwrite: bool, max_bytes: int) -> Job:
    """Read and hash one input (at most `max_bytes`); `inline` > 0 carries the bytes in the job (at most that many)."""
    data = read_uri(source.uri, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    job_id = job_id_for(digest, source.instruction, source.params, model, str(source.relative))
    if inline and len(data) > inline:
        raise InvalidParameters(f"{len(data)} bytes is over the inline limit of {inline} (ITSD_INLINE_MAX_BYTES)")
    return Job(
        job_id=job_id,
        batch_id="",
        model=model,
        instruction=source.instruction,
        params=source.params,
        output_uri=None if inline else join_uri(destination, str(source.relative)),
        input_uri=None if inline else source.uri,
        input_b64=base64.b64encode(data).decode() if inline else None,
        overwrite=overwrite,
        relative=str(source.relative),
    )


def submit_batch(
    broker: Broker,
    sources: list[BatchInput],
    rejected: list[Rejected],
    destination: str,
    model: str,
    inline: bool = False,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> Submission:
    """Record the batch and queue its unfinished jobs. `on_progress(n)` is called as inputs are read. No worker
    need serve the model yet; a resubmit is refused if the model was replaced since the batch was pinned."""
    registered = broker.registered(model)
    limit = broker.settings.inline_max_bytes if inline else 0
    jobs, refused = read_jobs(broker, sources, rejected, destination, model, limit, overwrite, on_progress)
    ids = sorted({j.job_id for j in jobs} | {r.job_id for r in refused})
    batch_id = hashlib.sha256(json.dumps([destination, model, ids]).encode()).hexdigest()[:16]
    keys = Keys(batch_id)
    check_pin(broker.client, keys, model, registered, overwrite)
    jobs = [replace(job, batch_id=batch_id) for job in jobs]
    pending, moving = unfinished(broker, keys, jobs, refused, overwrite)
    if not overwrite and not inline:
        pending = skip_existing_outputs(broker, keys, pending)
    info = {"destination": destination, "model": model, "inline": int(inline)}
    record_batch(broker, keys, jobs, refused, {**info, "total": len(ids)})
    enqueue(broker, pending, model)
    finished = len(jobs) - len(pending) - moving
    return Submission(batch_id, len(ids), len(pending), finished, len(refused), in_flight=moving)


def read_jobs(
    broker: Broker,
    sources: list[BatchInput],
    rejected: list[Rejected],
    destination: str,
    model: str,
    inline_limit: int,
    overwrite: bool,
    on_progress: Callable[[int], None] | None,
) -> tuple[list[Job], list[Result]]:
    """Each source's job (its input read, in parallel, for the job id), and a failed result for each input that
    could not be read or was rejected before."""
    refused = [
        Result(_failure_id(r.where), "failed", error_type=r.error.code, error_message=r.message) for r in rejected
    ]
    jobs: list[Job] = []
    max_bytes = broker.settings.max_input_bytes
    with ThreadPoolExecutor(READERS) as pool:
        futures = [pool.submit(_job_for, s, destination, model, inline_limit, overwrite, max_bytes) for s in sources]
        for source, future in zip(sources, futures, strict=True):
            try:
                jobs.append(future.result())
            except ItsdError as exc:
                where = source.uri
                refused.append(
                    Result(_failure_id(where), "failed", error_type=exc.code, error_message=f"{where}: {exc}")
                )
            if on_progress:
                on_progress(1)
    return jobs, refused


def check_pin(client: Any, keys: Keys, model: str, registered: str | None, overwrite: bool) -> None:
    """Meet a resubmitted batch's pin: refused when workers now register another identity for the model (its
    results so far would mix with the new model's); with `overwrite`, unpinned, as every job runs again and the
    first worker to take one pins it anew. A batch no worker has pinned yet, or a model no worker has
    registered, has nothing to compare: the workers check the pin themselves."""
    pinned = client.hget(keys.batch, PIN)
    if pinned is None:
        return
    if overwrite:
        client.hdel(keys.batch, PIN)
    elif registered is not None and pinned.decode() != registered:
        raise ModelMismatch(
            f"batch {keys.batch_id} was made with model {model} {pinned.decode()}, and its workers now serve "
            f"{registered} under that name: submit with --overwrite to recompute it all with {registered}, "
            "or with another --out"
        )


def unfinished(
    broker: Broker, keys: Keys, jobs: list[Job], refused: list[Result], overwrite: bool
) -> tuple[list[Job], int]:
    """The jobs a resubmission must send, and how many others are in flight. With `overwrite`: all of them.
    Otherwise those not done or skipped, less those whose message is still somewhere (waiting in the queue,
    held by a live worker, or sent a moment ago: core.holds), which would only be delivered twice; messages of
    workers that died holding them are handed back to the queue first. The results of those that run again
    (failed, cancelled) and of refused inputs are forgotten."""
    client = broker.client
    known = {k.decode(): v.decode() for k, v in client.hgetall(keys.statuses).items()}
    finished = set() if overwrite else {i for i, status in known.items() if status in ("done", "skipped")}
    rerun = [j.job_id for j in jobs if j.job_id in known and j.job_id not in finished]
    forget_results(client, keys, rerun + [r.job_id for r in refused])
    pending = [j for j in jobs if j.job_id not in finished]
    sent = {k.decode(): float(v) for k, v in client.hgetall(keys.queued).items()}
    candidates = {j.job_id for j in pending if j.job_id in sent and j.job_id not in known}
    if overwrite or not candidates:
        return pending, 0
    queue = queue_for(pending[0].model)
    hand_back(client, [queue], broker.settings.claim_ttl)
    moving = in_flight(client, queue, candidates, sent, broker.settings.claim_ttl)
    return [j for j in pending if j.job_id not in moving], len(moving)


def skip_existing_outputs(broker: Broker, keys: Keys, pending: list[Job]) -> list[Job]:
    """Record as skipped the jobs whose output already exists (checked in parallel); the others."""
    with ThreadPoolExecutor(READERS) as pool:
        exists = list(pool.map(lambda j: uri_exists(j.output_uri), pending))
    now = time.time()
    for job in (j for j, e in zip(pending, exists, strict=True) if e):
        skipped = Result(job.job_id, "skipped", job.output_uri, finished_at=now)
        record_result(broker.client, keys, skipped.to_dict(), broker.settings.result_expires)
    return [j for j, e in zip(pending, exists, strict=True) if not e]


def record_batch(broker: Broker, keys: Keys, jobs: list[Job], refused: list[Result], info: dict[str, Any]) -> None:
    """The batch record, its jobs (inline bytes left out) and its refused inputs, all expiring together, and its
    place among the batches by time."""
    client, expires, now = broker.client, broker.settings.result_expires, time.time()
    client.hsetnx(keys.batch, "created_at", now)
    client.hset(keys.batch, mapping={"batch_id": keys.batch_id, **info, "cancelled": 0, "submitted_at": now})
    for start in range(0, len(jobs), 1000):
        chunk = jobs[start : start + 1000]
        client.hset(keys.jobs, mapping={j.job_id: json.dumps(replace(j, input_b64=None).to_dict()) for j in chunk})
    for result in refused:
        record_result(client, keys, result.to_dict(), expires)
    for key in keys.all():
        client.expire(key, expires)
    client.zadd(Keys.batches, {keys.batch_id: now})


def enqueue(broker: Broker, jobs: list[Job], model: str) -> None:
    """Send each job to its model's queue, by task name (the task id is the job id), noting when in its batch's
    `queued` hash first (a resubmission sends again only what is not in flight: `unfinished`)."""
    queue, now = queue_for(model), time.time()
    by_batch: dict[str, dict[str, float]] = defaultdict(dict)
    for job in jobs:
        by_batch[job.batch_id][job.job_id] = now
    with broker.client.pipeline(transaction=False) as pipe:
        for batch_id, sent in by_batch.items():
            pipe.hset(Keys(batch_id).queued, mapping=sent)
            pipe.expire(Keys(batch_id).queued, broker.settings.result_expires)
        pipe.execute()
    with broker.app.producer_or_acquire() as producer:
        for job in jobs:
            message = replace(job, submitted_at=time.time()).to_dict()
            broker.app.send_task(TASK_NAME, args=[message], queue=queue, task_id=job.job_id, producer=producer)


# --- reading a batch back ---------------------------------------------------------------------------
def batch_record(client: Any, batch_id: str) -> dict[str, str]:
    record = {k.decode(): v.decode() for k, v in client.hgetall(Keys(batch_id).batch).items()}
    if "total" not in record:
        raise InvalidParameters(f"no batch {batch_id!r} on this broker (batches expire after ITSD_RESULT_EXPIRES)")
    return record


def progress(client: Any, batch_id: str) -> tuple[int, dict[str, int]]:
    """(total, counts per final status)."""
    total = int(batch_record(client, batch_id)["total"])
    return total, status_counts(client, Keys(batch_id))


def results(client: Any, batch_id: str) -> Iterator[Result]:
    for _, value in client.hscan_iter(Keys(batch_id).results, count=1000):
        yield Result.from_dict(json.loads(value))


def per_worker(found: list[Result]) -> dict[str, dict[str, float]]:
    """Jobs, images/s (over the worker's busy span) and mean seconds per job, by worker."""
    spans: dict[str, list[Result]] = defaultdict(list)
    for result in found:
        if result.worker and result.started_at and result.finished_at and result.status == "done":
            spans[result.worker].append(result)
    table = {}
    for worker, done in sorted(spans.items()):
        span = max(r.finished_at for r in done) - min(r.started_at for r in done)
        busy = sum(r.finished_at - r.started_at for r in done)
        table[worker] = {
            "done": len(done),
            "images_per_s": round(len(done) / span, 3) if span > 0 else 0.0,
            "s_per_image": round(busy / len(done), 3),
        }
    return table


def cancel_batch(client: Any, batch_id: str) -> int:
    """Mark the batch cancelled; workers record its queued jobs as cancelled without running them."""
    total, counts = progress(client, batch_id)
    client.hset(Keys(batch_id).batch, "cancelled", 1)
    return total - sum(counts.values())
