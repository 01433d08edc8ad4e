"""`itsd metrics`: the queue, as Prometheus reads it. Each scrape reads Redis, so dashboards and autoscalers
see the fleet from outside it (workers serve their own /metrics: `worker.metrics`).

- `itsd_queue_depth{model}`: messages waiting in `itsd.<model>` (LLEN, as KEDA's Redis lists scaler reads
  it), for every model a worker has registered and every `itsd.*` queue found, so a model scaled to zero, or
  one no worker has served yet, still shows its waiting jobs.
- `itsd_jobs_reserved{model}`: messages a worker has taken and not yet acknowledged. kombu keeps each one in
  its `unacked` hash (delivery tag -> [message, exchange, routing key]) until the task ends; the routing
  key is the queue. Reserved includes running: a worker takes one message per free slot (prefetch 1).
- `itsd_jobs_running`: jobs being computed now, the live claims (`itsd:claim:*`).
- `itsd_batch_jobs{batch,status}` and `itsd_batch_total{batch}` for the most recent batches.
- `itsd_dead_letters`, and `itsd_redis_up` (0 when Redis cannot be read; the rest is then absent).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import click

from core.queue import QUEUE_PREFIX
from core.records import Keys, status_counts
from producer.batch import Broker
from producer.submit import broker_option

log = logging.getLogger(__name__)
UNACKED = "unacked"  # kombu's Redis transport: messages delivered and not acknowledged


def _queue_of(entry: bytes) -> str | None:
    try:
        _, _, routing_key = json.loads(entry)
    except (ValueError, TypeError):
        return None
    return routing_key if isinstance(routing_key, str) else None


class QueueCollector:
    """A prometheus_client collector that reads the queue from Redis at each scrape."""

    def __init__(self, client: Any, batches: int = 20) -> None:
        self.client = client
        self.batches = batches

    def models(self) -> list[str]:
        registered = {name.decode() for name in self.client.hkeys(Keys.models)}
        queues = {
            key.decode()[len(QUEUE_PREFIX) :]
            for key in self.client.scan_iter(match=f"{QUEUE_PREFIX}*", count=1000, _type="list")
        }
        return sorted(registered | queues)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("itsd_redis_up", "1 when the exporter could read Redis at this scrape")
        try:
            families = list(self._families(GaugeMetricFamily))
        except Exception as exc:  # redis-py's errors, and anything else: one scrape fails, the exporter lives
            log.warning("cannot read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, gauge: Any) -> Iterator[Any]:
        models = self.models()
        depth = gauge("itsd_queue_depth", "Messages waiting in the model's queue, itsd.<model>", labels=["model"])
        for model, length in zip(models, self._pipelined("llen", [QUEUE_PREFIX + m for m in models]), strict=True):
            depth.add_metric([model], length)
        yield depth

        taken = Counter(_queue_of(entry) for entry in self.client.hvals(UNACKED))
        reserved = gauge("itsd_jobs_reserved", "Messages taken by a worker, not yet acknowledged", labels=["model"])
        for model in models:
            reserved.add_metric([model], taken.get(QUEUE_PREFIX + model, 0))
        yield reserved

        running = sum(1 for _ in self.client.scan_iter(match=Keys.claim("*"), count=1000))
        yield gauge("itsd_jobs_running", "Jobs being computed now (live claims)", value=running)

        total = gauge("itsd_batch_total", "Jobs in a recent batch", labels=["batch"])
        jobs = gauge("itsd_batch_jobs", "A recent batch's jobs by final status", labels=["batch", "status"])
        for raw in self.client.zrevrange(Keys.batches, 0, self.batches - 1):
            batch = raw.decode()
            size = self.client.hget(Keys(batch).batch, "total")
            if size is None:  # expired
                continue
            total.add_metric([batch], int(size))
            for status, count in status_counts(self.client, Keys(batch)).items():
                jobs.add_metric([batch, status], count)
        yield total
        yield jobs
        yield gauge("itsd_dead_letters", "Jobs in the dead-letter list", value=self.client.llen(Keys.dead))

    def _pipelined(self, command: str, keys: list[str]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            getattr(pipe, command)(key)
        return [int(value) for value in pipe.execute()]


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=9809, show_default=True, help="Port to serve on.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--batches", type=click.IntRange(0), default=20, show_default=True, help="Recent batches to report.")
@broker_option
def metrics(port: int, host: str, batches: int, broker: Broker) -> None:
    """Serve the queue's metrics for Prometheus (and autoscalers) on http://HOST:PORT/metrics: depth per
    model, jobs reserved and running, recent batches' progress, dead letters. Reads Redis at each scrape."""
    import redis
    from prometheus_client import CollectorRegistry, start_http_server

    # its own client: a scrape while Redis is down answers itsd_redis_up 0 in seconds, not after a minute of
    # the retries the producer's client rides restarts out with
    client = redis.Redis.from_url(broker.url, socket_connect_timeout=3, socket_timeout=5)
    registry = CollectorRegistry()
    registry.register(QueueCollector(client, batches))
    server, _ = start_http_server(port, host, registry=registry)
    click.echo(f"queue metrics on http://{host}:{server.server_address[1]}/metrics", err=True)
    # handlers of its own: as a container's PID 1 it gets no default action for SIGTERM, so a stop would wait
    # out its grace period and kill it
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    server.shutdown()
