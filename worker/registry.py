"""What a worker tells Redis about itself: the identity of each model it serves (`itsd:models`, which
producers read to refuse resubmitting a batch made with another model under the same name) and its own
record (`itsd:workers`: models, what runs them, device, slots), renewed by a heartbeat while it runs and
removed when it stops, for `itsd workers`."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from core.holds import hand_back
from core.queue import WORKER_HEARTBEAT_S
from core.records import Keys
from core.redis_url import redis_client
from worker.jobs import ModelSpec

log = logging.getLogger(__name__)


def register(url: str, models: dict[str, ModelSpec], hostname: str) -> None:
    """Announce the identity of each model this worker serves, so producers can tell when a model was replaced
    under its name without reading the artifacts."""
    client = redis_client(url)
    for spec in models.values():
        entry = {"model_id": spec.model_id, "source": spec.source, "worker": hostname, "at": time.time()}
        previous = client.hget(Keys.models, spec.name)
        if previous and json.loads(previous)["model_id"] != spec.model_id:
            log.warning(
                "model %s was registered as %s; now %s", spec.name, json.loads(previous)["model_id"], spec.model_id
            )
        client.hset(Keys.models, spec.name, json.dumps(entry))


class WorkerRecord:
    """This worker's entry in `itsd:workers`, renewed every WORKER_HEARTBEAT_S on a thread until `close`. Each
    beat also hands back to `queues` the messages that workers died holding (core.holds), so a killed worker's
    job waits about a claim TTL, not the visibility timeout, whether or not a producer is waiting."""

    def __init__(self, url: str, hostname: str, fields: dict[str, Any], queues: list[str], claim_ttl: float) -> None:
        self.client = redis_client(url)
        self.hostname = hostname
        self.queues, self.claim_ttl = queues, claim_ttl
        self.entry = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(), **fields}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="itsd-heartbeat", daemon=True)

    def start(self) -> WorkerRecord:
        self._write()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.client.hdel(Keys.workers, self.hostname)
        except Exception as exc:  # Redis gone at shutdown: the record ages out as "gone"
            log.warning("could not remove this worker's record: %s", exc)

    def _write(self) -> None:
        self.client.hset(Keys.workers, self.hostname, json.dumps({**self.entry, "seen_at": time.time()}))

    def _beat(self) -> None:
        while not self._stop.wait(WORKER_HEARTBEAT_S):
            try:
                self._write()
                handed = hand_back(self.client, self.queues, self.claim_ttl)
            except Exception as exc:  # a Redis restart: the next beat writes it again
                log.warning("heartbeat not written: %s", exc)
                continue
            if handed:
                log.warning("handed back %d job(s) that a dead worker held: %s", len(handed), ", ".join(handed))
