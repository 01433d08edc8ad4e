"""Jobs whose message was lost, found and sent again, so that a batch never waits forever.

kombu's Redis transport takes a message with BRPOP, and records it as taken (in its `unacked` hash, from
which a dead worker's messages come back) with a second command. If Redis stops between the two (a
restart, a SIGKILL) or the reply never reaches the worker, the message is in neither place: the job is
pending and nothing will run it. `bench/soak.py` met this once in 4,000 jobs under 20 faults.

A job is lost when its batch has no final result for it, its queue is empty (so its message is not
waiting), no worker holds its claim (so it is not running) and no taken message carries its id (so it is
not waiting on a retry's countdown, or for a dead worker's messages to come back). `itsd submit --wait`
looks once progress has stalled, and sends such jobs again. Sending one twice by mistake costs nothing:
the claim and the output check make the second delivery a skip. Inline jobs cannot be sent again
(their bytes are not kept), so they are recorded failed with the reason: submit the batch again.
"""

from __future__ import annotations

import json
import time
from typing import Any

from core.job import Job, Result
from core.queue import queue_for
from core.records import Keys, record_result
from producer.batch import Broker, batch_record, enqueue

UNACKED = "unacked"  # kombu's hash of taken messages: delivery tag -> JSON [message, exchange, routing key]


def _taken_ids(client: Any) -> set[str]:
    """Task ids (our job ids) of the messages workers hold, acknowledged or not yet."""
    ids = set()
    for _, value in client.hscan_iter(UNACKED, count=1000):
        try:
            ids.add(json.loads(value)[0]["headers"]["id"])
        except (ValueError, LookupError, TypeError):  # not a Celery message: not one of ours
            continue
    return ids


def lost_jobs(client: Any, batch_id: str, model: str) -> list[str]:
    """The batch's job ids that are not final, not queued, not running and not held by any worker."""
    if client.llen(queue_for(model)):
        return []  # a job may still be waiting in the queue; only an empty queue is conclusive
    keys = Keys(batch_id)
    pending = {k.decode() for k in client.hkeys(keys.jobs)} - {k.decode() for k in client.hkeys(keys.statuses)}
    if not pending:
        return []
    candidates = sorted(pending - _taken_ids(client))
    with client.pipeline(transaction=False) as pipe:
        for job_id in candidates:
            pipe.exists(Keys.claim(job_id))
        claimed = pipe.execute()
    return [job_id for job_id, held in zip(candidates, claimed, strict=True) if not held]


def requeue_lost(broker: Broker, batch_id: str) -> int:
    """Send the batch's lost jobs again (inline ones are recorded failed); how many there were."""
    client, record = broker.client, batch_record(broker.client, batch_id)
    keys = Keys(batch_id)
    lost = lost_jobs(client, batch_id, record["model"])
    if not lost:
        return 0
    jobs = [Job.from_dict(json.loads(client.hget(keys.jobs, job_id))) for job_id in lost]
    if record.get("inline") == "1":
        for job in jobs:
            reason = "its message was lost (Redis stopped as a worker took it); submit the batch again"
            failed = Result(job.job_id, "failed", error_type="lost", error_message=reason, finished_at=time.time())
            record_result(client, keys, failed.to_dict(), broker.settings.result_expires)
    else:
        enqueue(broker, jobs, record["model"])
    client.hincrby(keys.batch, "requeued", len(jobs))
    return len(jobs)
