"""Jobs whose message is gone or stuck, found and sent again, so that a batch never waits an hour or forever.

Two ways a job's message goes missing while the batch is pending (core.holds tells where a message is):
- its worker died holding it (SIGKILL, the OOM killer, a lost machine): the message sits in kombu's `unacked`
  hash until the visibility timeout, an hour. Once no live worker has held the job's claim for a claim TTL,
  it is handed back to the queue (workers do this at each heartbeat too: worker.registry).
- Redis stopped as a worker took it: kombu takes a message with BRPOP and records it as taken with a second
  command, so a kill between the two (or a reply that never reaches the worker) leaves it in neither place.
  A job that is not final, not waiting in its queue, not held, not claimed and not sent a moment ago is lost,
  and sent again. `bench/soak.py` met this once in 4,000 jobs under 20 faults.
`itsd submit --wait` (and `itsd run`) look once progress has stalled. Sending one twice by mistake costs
nothing: the claim and the output check make the second delivery a skip. Inline jobs cannot be sent again
(their bytes are not kept), so they are recorded failed with the reason: submit the batch again.
"""

from __future__ import annotations

import json
import time
from typing import Any

from core.holds import hand_back, in_flight
from core.job import Job, Result
from core.queue import queue_for
from core.records import Keys, record_result
from producer.batch import Broker, batch_record, enqueue


def lost_jobs(client: Any, batch_id: str, model: str, claim_ttl: float) -> list[str]:
    """The batch's job ids that are not final and whose message is nowhere (core.holds.in_flight). Only an
    empty queue is looked into: while messages wait, a worker may yet take the job's."""
    queue = queue_for(model)
    if client.llen(queue):
        return []
    keys = Keys(batch_id)
    pending = {k.decode() for k in client.hkeys(keys.jobs)} - {k.decode() for k in client.hkeys(keys.statuses)}
    if not pending:
        return []
    sent = {k.decode(): float(v) for k, v in client.hgetall(keys.queued).items()}
    return sorted(pending - in_flight(client, queue, pending, sent, claim_ttl))


def requeue_lost(broker: Broker, batch_id: str, client: Any = None) -> tuple[int, int]:
    """Hand back the messages of the batch's model that dead workers held, then send the batch's lost jobs
    again (inline ones are recorded failed): (handed back, lost). `client` reads Redis (default: the broker's)."""
    client = client or broker.client
    record, keys, ttl = batch_record(client, batch_id), Keys(batch_id), broker.settings.claim_ttl
    handed = len(hand_back(client, [queue_for(record["model"])], ttl))
    lost = lost_jobs(client, batch_id, record["model"], ttl)
    if not lost:
        return handed, 0
    jobs = [Job.from_dict(json.loads(client.hget(keys.jobs, job_id))) for job_id in lost]
    if record.get("inline") == "1":
        for job in jobs:
            reason = "its message was lost (Redis stopped as a worker took it); submit the batch again"
            failed = Result(job.job_id, "failed", error_type="lost", error_message=reason, finished_at=time.time())
            record_result(client, keys, failed.to_dict(), broker.settings.result_expires)
    else:
        enqueue(broker, jobs, record["model"])
    client.hincrby(keys.batch, "requeued", len(jobs))
    return handed, len(jobs)
