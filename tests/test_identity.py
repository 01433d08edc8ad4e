"""A model's identity without a worker, against a real redis-server: job ids come from the model's name, so a
batch is queued before any worker has served the model; the batch is pinned to the identity of the first
worker that runs one of its jobs (core/lua/pin.lua), and a resubmit meets that pin (producer/batch.py)."""

from __future__ import annotations

import json
import threading
from pathlib import PurePosixPath

import pytest
from conftest import photo

from core.errors import ModelMismatch
from core.params import EditParams
from core.queue import queue_for
from core.records import PIN, Keys, pin_model, record_result
from producer.batch import Broker, submit_batch
from producer.local import RedisServer
from producer.sources import BatchInput


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as server:
        yield server


def inputs(tmp_path, count: int = 3) -> list[BatchInput]:
    found = []
    for i in range(count):
        photo(32, 32, seed=i).save(tmp_path / f"{i}.png")
        found.append(BatchInput(str(tmp_path / f"{i}.png"), PurePosixPath(f"{i}.png"), "x", EditParams(steps=1)))
    return found


def register(broker: Broker, model_id: str) -> None:
    """What `worker.registry.register` writes for model m."""
    broker.client.hset(Keys.models, "m", json.dumps({"model_id": model_id, "source": "/models/m", "worker": "w"}))


def job_ids(broker: Broker, batch_id: str) -> list[str]:
    return sorted(k.decode() for k in broker.client.hkeys(Keys(batch_id).jobs))


def queued(broker: Broker) -> int:
    return broker.client.llen(queue_for("m"))


def test_a_batch_for_a_model_no_worker_has_served_is_queued_unpinned(broker, tmp_path):
    submission = submit_batch(broker, inputs(tmp_path), [], str(tmp_path / "out"), "m")
    assert submission.queued == 3 and queued(broker) == 3
    assert not broker.client.hexists(Keys(submission.batch_id).batch, PIN)


def test_job_ids_and_the_batch_are_the_same_whether_or_not_a_worker_registered_the_model(broker, tmp_path):
    sources = inputs(tmp_path)
    before = submit_batch(broker, sources, [], str(tmp_path / "out"), "m")
    ids = job_ids(broker, before.batch_id)
    register(broker, "model-1")
    after = submit_batch(broker, sources, [], str(tmp_path / "out"), "m")
    assert after.batch_id == before.batch_id and job_ids(broker, after.batch_id) == ids
    other = submit_batch(broker, sources, [], str(tmp_path / "out"), "n")  # another model's name: other jobs
    assert other.batch_id != before.batch_id and not set(job_ids(broker, other.batch_id)) & set(ids)


def test_the_first_identity_to_ask_pins_the_batch_and_every_later_one_reads_it(broker):
    keys = Keys("b1")
    broker.client.hset(keys.batch, "total", 1)
    assert pin_model(broker.client, keys, "model-1") == "model-1"
    assert pin_model(broker.client, keys, "model-2") == "model-1"
    assert broker.client.hget(keys.batch, PIN) == b"model-1"


def test_workers_racing_on_an_unpinned_batch_all_see_one_pin(broker, redis):
    from core.redis_url import redis_client

    keys, start, seen = Keys("b1"), threading.Barrier(16), []
    broker.client.hset(keys.batch, "total", 1)

    def ask(model_id: str) -> None:
        client = redis_client(redis.url)
        start.wait()
        seen.append(pin_model(client, keys, model_id))

    threads = [threading.Thread(target=ask, args=(f"model-{i}",)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 16 and len(set(seen)) == 1 and broker.client.hget(keys.batch, PIN).decode() == seen[0]


def test_a_pin_does_not_recreate_an_expired_batch_record(broker):
    assert pin_model(broker.client, Keys("gone"), "model-1") == "model-1"
    assert not broker.client.exists(Keys("gone").batch)


def pinned_batch(broker: Broker, tmp_path, model_id: str) -> str:
    """A batch of three jobs that a worker serving `model_id` pinned and finished one of."""
    submission = submit_batch(broker, inputs(tmp_path), [], str(tmp_path / "out"), "m")
    keys = Keys(submission.batch_id)
    pin_model(broker.client, keys, model_id)
    done = {"job_id": job_ids(broker, submission.batch_id)[0], "status": "done", "model_id": model_id}
    record_result(broker.client, keys, done, 60)
    broker.client.delete(queue_for("m"))  # the workers took the rest
    return submission.batch_id


def test_a_resubmit_after_the_model_was_replaced_under_its_name_is_refused_naming_both(broker, tmp_path):
    batch_id = pinned_batch(broker, tmp_path, "model-1")
    register(broker, "model-2")
    with pytest.raises(ModelMismatch) as refused:
        submit_batch(broker, inputs(tmp_path), [], str(tmp_path / "out"), "m")
    assert str(refused.value) == (
        f"batch {batch_id} was made with model m model-1, and its workers now serve model-2 under that name: "
        "submit with --overwrite to recompute it all with model-2, or with another --out"
    )
    keys = Keys(batch_id)
    assert queued(broker) == 0 and broker.client.hlen(keys.results) == 1  # nothing queued, nothing forgotten
    assert broker.client.hget(keys.batch, PIN) == b"model-1"


def test_a_resubmit_with_overwrite_unpins_the_batch_and_runs_every_job_again(broker, tmp_path):
    batch_id = pinned_batch(broker, tmp_path, "model-1")
    register(broker, "model-2")
    again = submit_batch(broker, inputs(tmp_path), [], str(tmp_path / "out"), "m", overwrite=True)
    keys = Keys(batch_id)
    assert again.batch_id == batch_id and again.queued == 3 and queued(broker) == 3
    assert not broker.client.hexists(keys.batch, PIN) and broker.client.hlen(keys.results) == 0


@pytest.mark.parametrize("registered", [None, "model-1"], ids=["no worker registered", "the same model"])
def test_a_resubmit_goes_on_while_nothing_says_the_model_changed(broker, tmp_path, registered):
    batch_id = pinned_batch(broker, tmp_path, "model-1")
    broker.client.delete(Keys.models)
    if registered:
        register(broker, registered)
    again = submit_batch(broker, inputs(tmp_path), [], str(tmp_path / "out"), "m")
    assert again.batch_id == batch_id and again.finished == 1  # not refused, and the done job is not rerun
    assert (again.queued, again.in_flight) == (0, 2)  # the two the workers took a moment ago are not sent again
    assert broker.client.hget(Keys(batch_id).batch, PIN) == b"model-1"  # the workers check it
