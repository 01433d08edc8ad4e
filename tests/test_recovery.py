"""Lost messages (producer/recovery.py) against a real redis-server: a job taken from its queue and never
recorded as taken is found and sent again; a job that is queued, held or running is left alone."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest
from conftest import photo

from core.params import EditParams
from core.queue import queue_for
from core.records import Keys, status_counts
from producer.batch import submit_batch
from producer.local import RedisServer
from producer.recovery import UNACKED, lost_jobs, requeue_lost
from producer.sources import BatchInput

QUEUE = queue_for("m")


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as server:
        yield server


def batch(broker, tmp_path, count: int = 3, inline: bool = False) -> tuple[str, list[str]]:
    found = []
    for i in range(count):
        photo(32, 32, seed=i).save(tmp_path / f"{i}.png")
        found.append(BatchInput(str(tmp_path / f"{i}.png"), PurePosixPath(f"{i}.png"), "x", EditParams(steps=1)))
    submission = submit_batch(broker, found, [], str(tmp_path / "out"), "m", inline=inline)
    ids = sorted(k.decode() for k in broker.client.hkeys(Keys(submission.batch_id).jobs))
    return submission.batch_id, ids


def take_all(broker) -> list[dict]:
    """What BRPOP does for a worker: the messages leave the queue."""
    return [json.loads(broker.client.rpop(QUEUE)) for _ in range(broker.client.llen(QUEUE))]


def test_only_jobs_in_no_queue_no_worker_and_no_claim_are_lost(broker, tmp_path):
    batch_id, ids = batch(broker, tmp_path)
    assert lost_jobs(broker.client, batch_id, "m") == []  # all still queued
    messages = {m["headers"]["id"]: m for m in take_all(broker)}
    assert lost_jobs(broker.client, batch_id, "m") == ids
    held, running, _ = ids
    broker.client.hset(UNACKED, "tag-1", json.dumps([messages[held], "", QUEUE]))  # a worker holds it
    broker.client.set(Keys.claim(running), "host:1:x")  # a worker runs it
    assert lost_jobs(broker.client, batch_id, "m") == [ids[2]]


def test_lost_jobs_are_sent_again_and_counted_and_finished_ones_are_not(broker, tmp_path):
    batch_id, ids = batch(broker, tmp_path)
    take_all(broker)
    broker.client.hset(Keys(batch_id).statuses, ids[0], "done")
    assert requeue_lost(broker, batch_id) == 2
    again = sorted(m["headers"]["id"] for m in take_all(broker))
    assert again == ids[1:] and broker.client.hget(Keys(batch_id).batch, "requeued") == b"2"


def test_a_lost_inline_job_cannot_be_sent_again_so_it_ends_failed_with_the_reason(broker, tmp_path):
    batch_id, ids = batch(broker, tmp_path, count=1, inline=True)
    take_all(broker)
    assert requeue_lost(broker, batch_id) == 1
    assert broker.client.llen(QUEUE) == 0 and status_counts(broker.client, Keys(batch_id))["failed"] == 1
    result = json.loads(broker.client.hget(Keys(batch_id).results, ids[0]))
    assert result["error_type"] == "lost" and "submit the batch again" in result["error_message"]
