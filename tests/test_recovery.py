"""Lost and stuck messages (core/holds.py, producer/recovery.py, producer/batch.py's resubmission) against a
real redis-server: a job taken from its queue and never recorded as taken is found and sent again; a message
held by a dead worker goes back to the queue after a claim TTL, not the visibility timeout; a job that is
queued, held by a live worker or running is left alone, and a resubmission does not send it again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import PurePosixPath

import pytest
from conftest import photo

from core.holds import HOST, UNACKED, UNACKED_INDEX, hand_back, holds
from core.params import EditParams
from core.queue import queue_for
from core.records import Keys, status_counts
from producer.batch import submit_batch
from producer.local import RedisServer
from producer.recovery import lost_jobs, requeue_lost
from producer.sources import BatchInput

QUEUE = queue_for("m")


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as server:
        yield server


def sources(tmp_path, count: int) -> list[BatchInput]:
    found = []
    for i in range(count):
        photo(32, 32, seed=i).save(tmp_path / f"{i}.png")
        found.append(BatchInput(str(tmp_path / f"{i}.png"), PurePosixPath(f"{i}.png"), "x", EditParams(steps=1)))
    return found


def batch(broker, tmp_path, count: int = 3, inline: bool = False) -> tuple[str, list[str]]:
    submission = submit_batch(broker, sources(tmp_path, count), [], str(tmp_path / "out"), "m", inline=inline)
    ids = sorted(k.decode() for k in broker.client.hkeys(Keys(submission.batch_id).jobs))
    return submission.batch_id, ids


def take_all(broker) -> list[dict]:
    """What BRPOP does for a worker: the messages leave the queue."""
    return [json.loads(broker.client.rpop(QUEUE)) for _ in range(broker.client.llen(QUEUE))]


def sent_long_ago(broker, batch_id: str) -> None:
    """As if the batch's messages were sent a while ago (a worker takes and records one within a claim TTL)."""
    keys = Keys(batch_id)
    broker.client.hset(keys.queued, mapping=dict.fromkeys(broker.client.hkeys(keys.queued), time.time() - 3600))


def hold(broker, message: dict, taken_at: float, tag: str = "tag-1") -> None:
    """What kombu records when a worker takes a message: the message by its delivery tag, and when."""
    broker.client.hset(UNACKED, tag, json.dumps([message, QUEUE, QUEUE]))
    broker.client.zadd(UNACKED_INDEX, {tag: taken_at})


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    return int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout)


def test_only_jobs_in_no_queue_no_worker_and_no_claim_are_lost(broker, tmp_path):
    batch_id, ids = batch(broker, tmp_path)
    assert lost_jobs(broker.client, batch_id, "m", 60) == []  # all still queued
    messages = {m["headers"]["id"]: m for m in take_all(broker)}
    assert lost_jobs(broker.client, batch_id, "m", 60) == []  # sent a moment ago: a worker may be recording it
    sent_long_ago(broker, batch_id)
    assert lost_jobs(broker.client, batch_id, "m", 60) == ids
    held, running, _ = ids
    hold(broker, messages[held], time.time())  # a worker holds it
    broker.client.set(Keys.claim(running), "host:1:x")  # a worker runs it
    assert lost_jobs(broker.client, batch_id, "m", 60) == [ids[2]]


def test_lost_jobs_are_sent_again_and_counted_and_finished_ones_are_not(broker, tmp_path):
    batch_id, ids = batch(broker, tmp_path)
    take_all(broker)
    sent_long_ago(broker, batch_id)
    broker.client.hset(Keys(batch_id).statuses, ids[0], "done")
    assert requeue_lost(broker, batch_id) == (0, 2)
    again = sorted(m["headers"]["id"] for m in take_all(broker))
    assert again == ids[1:] and broker.client.hget(Keys(batch_id).batch, "requeued") == b"2"


def test_a_message_held_by_a_worker_that_died_goes_back_to_the_front_of_its_queue(broker, tmp_path):
    batch(broker, tmp_path, count=2)
    first, second = take_all(broker)
    broker.client.lpush(QUEUE, json.dumps(second))  # another job waits in the queue
    taken = time.time()
    hold(broker, first, taken)
    assert hand_back(broker.client, [QUEUE], 60, now=taken + 59) == []  # the worker may not have claimed it yet
    assert hand_back(broker.client, ["itsd.other"], 60, now=taken + 61) == []  # not a queue this sweeper serves
    claim = Keys.claim(first["headers"]["id"])
    broker.client.set(claim, "elsewhere:1:x")  # claimed by a worker of another host: alive while it renews
    assert hand_back(broker.client, [QUEUE], 60, now=taken + 3600) == []
    broker.client.delete(claim)  # its worker died: the claim expired
    assert hand_back(broker.client, [QUEUE], 60, now=taken + 61) == [first["headers"]["id"]]
    assert holds(broker.client) == [] and broker.client.zcard(UNACKED_INDEX) == 0
    assert json.loads(broker.client.rpop(QUEUE))["headers"]["id"] == first["headers"]["id"]  # it goes next
    assert broker.client.llen(QUEUE) == 1


def test_a_job_claimed_by_a_dead_process_of_this_host_goes_back_at_once(broker, tmp_path):
    _, ids = batch(broker, tmp_path, count=1)
    (message,) = take_all(broker)
    hold(broker, message, time.time())
    broker.client.set(Keys.claim(ids[0]), f"{HOST}:{dead_pid()}:x", px=60_000)  # SIGKILLed with its whole group
    assert hand_back(broker.client, [QUEUE], 60) == ids


def test_a_retry_waiting_for_its_countdown_is_not_taken_for_abandoned(broker, tmp_path):
    _, ids = batch(broker, tmp_path, count=1)
    (message,) = take_all(broker)
    taken = time.time()
    message["headers"]["eta"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(taken + 50))
    hold(broker, message, taken)
    assert hand_back(broker.client, [QUEUE], 60, now=taken + 100) == []  # held, unclaimed, until 50 s + a TTL
    assert hand_back(broker.client, [QUEUE], 60, now=taken + 111) == ids


def test_a_resubmitted_batch_sends_again_only_jobs_whose_message_is_nowhere(broker, tmp_path):
    found = sources(tmp_path, 4)
    first = submit_batch(broker, found, [], str(tmp_path / "out"), "m")
    again = submit_batch(broker, found, [], str(tmp_path / "out"), "m")
    assert (again.queued, again.in_flight, again.finished) == (0, 4, 0)  # still queued: not sent twice
    assert broker.client.llen(QUEUE) == 4
    messages = {m["headers"]["id"]: m for m in take_all(broker)}
    sent_long_ago(broker, first.batch_id)
    waiting, held, running, lost = sorted(messages)
    broker.client.lpush(QUEUE, json.dumps(messages[waiting]))
    hold(broker, messages[held], time.time())
    broker.client.set(Keys.claim(running), "elsewhere:1:x")
    third = submit_batch(broker, found, [], str(tmp_path / "out"), "m")
    assert (third.queued, third.in_flight) == (1, 3)
    assert sorted(m["headers"]["id"] for m in take_all(broker)) == sorted([waiting, lost])


def test_a_lost_inline_job_cannot_be_sent_again_so_it_ends_failed_with_the_reason(broker, tmp_path):
    batch_id, ids = batch(broker, tmp_path, count=1, inline=True)
    take_all(broker)
    sent_long_ago(broker, batch_id)
    assert requeue_lost(broker, batch_id) == (0, 1)
    assert broker.client.llen(QUEUE) == 0 and status_counts(broker.client, Keys(batch_id))["failed"] == 1
    result = json.loads(broker.client.hget(Keys(batch_id).results, ids[0]))
    assert result["error_type"] == "lost" and "submit the batch again" in result["error_message"]
