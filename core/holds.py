"""Where a job's message is (waiting in its queue, held by a worker, or nowhere), and handing back the
messages of workers that died holding them, so that no job waits for the visibility timeout.

kombu's Redis transport takes a message from its queue (BRPOP) and records it in its `unacked` hash
(delivery tag -> JSON [message, exchange, routing key], the time taken in `unacked_index`) until the
worker acknowledges it; it hands a message back by itself only after the visibility timeout, an hour,
since a job may run that long. A holder that died (SIGKILL, the OOM killer, a lost machine, a Redis kill
that cut it off as it took the message) says so much sooner: a worker takes its job's claim moments
after taking the message (worker.claims) and renews it every third of ITSD_CLAIM_TTL while the job runs.
So a message held for a claim TTL (counted from its retry's ETA, if it has one) while no live worker
holds its job's claim has no holder left; on this host, a claim whose owner's process is gone is dead at
once. `hand_back` puts such messages back at the front of their queue, as kombu would at the timeout. If
the holder was alive after all (slow to start the job), the second delivery finds the claim or the
output, and is skipped: a job is never computed twice.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.records import Keys

UNACKED = "unacked"  # kombu's hash of taken messages: delivery tag -> JSON [message, exchange, routing key]
UNACKED_INDEX = "unacked_index"  # kombu's sorted set: delivery tag by the time it was taken
HOST = socket.gethostname()
SCAN = 1000  # queue entries read per LRANGE


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_dead(owner: str) -> bool:
    """True only when the owner (`host:pid:nonce`) ran on this host and its process is gone; unknown hosts
    count as alive (their claims expire instead)."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    return parts[0] == HOST and not process_alive(int(parts[1]))


@dataclass(frozen=True)
class Hold:
    """A message a worker has taken and not acknowledged."""

    tag: str  # kombu's delivery tag
    job_id: str  # the task id, which is the job id
    queue: str  # the routing key it came by: its queue
    taken_at: float  # when the worker took it (its clock)
    eta: float | None  # a retry's countdown: the worker holds it, unclaimed, until then


def _eta(headers: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(headers["eta"]).timestamp() if headers.get("eta") else None
    except (TypeError, ValueError):
        return None


def holds(client: Any) -> list[Hold]:
    """Every message workers hold now (Celery's, that is: other entries are not ours)."""
    found = []
    for tag, raw in client.hscan_iter(UNACKED, count=1000):
        try:
            message, _, routing_key = json.loads(raw)
            headers = message["headers"]
            found.append(Hold(tag.decode(), str(headers["id"]), str(routing_key), 0.0, _eta(headers)))
        except (ValueError, LookupError, TypeError):
            continue
    with client.pipeline(transaction=False) as pipe:
        for hold in found:
            pipe.zscore(UNACKED_INDEX, hold.tag)
        taken = pipe.execute()
    now = time.time()  # an entry without its index entry (half written when Redis stopped) counts as just taken
    return [Hold(h.tag, h.job_id, h.queue, at or now, h.eta) for h, at in zip(found, taken, strict=True)]


def claim_owners(client: Any, job_ids: Iterable[str]) -> dict[str, str | None]:
    """Who holds each job's claim (`host:pid:nonce`), None where nobody does."""
    ids = list(job_ids)
    with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.get(Keys.claim(job_id))
        owners = pipe.execute()
    return {job_id: owner.decode() if owner else None for job_id, owner in zip(ids, owners, strict=True)}


def live_claims(client: Any, job_ids: Iterable[str]) -> set[str]:
    """The jobs that a worker, not known to be dead, is running now."""
    return {job_id for job_id, owner in claim_owners(client, job_ids).items() if owner and not owner_is_dead(owner)}


def abandoned(client: Any, queues: Iterable[str], claim_ttl: float, now: float | None = None) -> list[Hold]:
    """Messages of `queues` whose job's claim is held by a dead process of this host, or that were held for a
    claim TTL (after their ETA) while no worker claimed their job."""
    now = time.time() if now is None else now
    names = set(queues)
    wanted = [h for h in holds(client) if h.queue in names]
    owners = claim_owners(client, (h.job_id for h in wanted))

    def gone(hold: Hold) -> bool:
        owner = owners[hold.job_id]
        return owner_is_dead(owner) if owner else now > max(hold.taken_at, hold.eta or 0.0) + claim_ttl

    return [h for h in wanted if gone(h)]


def hand_back(client: Any, queues: Iterable[str], claim_ttl: float, now: float | None = None) -> list[str]:
    """Put the abandoned messages of `queues` back at the front of their queue, as kombu does at the
    visibility timeout (in one transaction each: two sweepers cannot both hand one back); their job ids."""
    handed = []
    for hold in abandoned(client, queues, claim_ttl, now):

        def restore(pipe: Any, hold: Hold = hold) -> bool:
            raw = pipe.hget(UNACKED, hold.tag)
            pipe.multi()
            pipe.zrem(UNACKED_INDEX, hold.tag)
            pipe.hdel(UNACKED, hold.tag)
            if raw is None:  # acknowledged, or handed back by another sweeper, meanwhile
                return False
            message = json.loads(raw)[0]
            message.setdefault("headers", {})["redelivered"] = True
            pipe.rpush(hold.queue, json.dumps(message))  # BRPOP takes from the right: it goes next
            return True

        if client.transaction(restore, UNACKED, value_from_callable=True):
            handed.append(hold.job_id)
    return handed


def waiting(client: Any, queue: str) -> set[str]:
    """Job ids of the messages waiting in `queue` (read in slices: a long queue costs time, not memory)."""
    ids: set[str] = set()
    for start in range(0, client.llen(queue), SCAN):
        for raw in client.lrange(queue, start, start + SCAN - 1):
            try:
                ids.add(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, LookupError, TypeError):  # not a message: the worker dead-letters it
                continue
    return ids


def in_flight(client: Any, queue: str, job_ids: Iterable[str], sent_at: dict[str, float], claim_ttl: float) -> set[str]:
    """Those of `job_ids` whose message is somewhere: waiting in `queue`, held by a worker, its job claimed by
    a live worker, or sent less than a claim TTL ago (a worker may be between taking it and recording it).
    The queue is read first, then the holds: a message that moves between the two reads is seen in the second."""
    ids = set(job_ids)
    now = time.time()
    found = {i for i in ids if now - sent_at.get(i, 0.0) < claim_ttl}
    found |= waiting(client, queue) & ids
    found |= {h.job_id for h in holds(client)} & ids
    return found | live_claims(client, ids - found)
