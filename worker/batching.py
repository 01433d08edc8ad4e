"""Jobs batched together: concurrent jobs on one model share UNet calls (dynamic batching, as Triton's).

With `itsd worker --batch-jobs N` a worker runs up to N jobs at once as threads of one process, over one
loaded model. Each job runs its own edit (`core.edit`), claim, output and result, exactly as it would alone;
only its UNet calls go through a `Batcher`, which concatenates the calls that are waiting, runs them as one
call, and hands each job its own rows back. The UNet's inputs are per sample (latents, timestep, text), so
jobs at different steps, with different instructions or guidance, batch together; only the tile shape must
match, and calls of another shape run in their own batch.

When to run: a job is a member of the batch from its first UNet call until it calls any other model (its
VAE decode) or its edit ends. A batch runs as soon as every member has a call waiting, or `max_wait` after
its oldest call (a member busy between steps, say), and one batch runs at a time: while it runs, the next
one gathers. If a batched call fails, each of its calls is run again alone, so a job that breaks the model
fails by itself and never fails its batch mates.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery.concurrency import thread

from core.edit import Backend, ModelFacts

UnetCall = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class HandedBack(Exception):
    """Raised in a running job at its next model call when the worker must stop before the job can end
    (the soft shutdown timeout passed): the job gives its message back to the queue, unfinished."""


class ThreadPool(thread.TaskPool):
    """Celery's thread pool, with the one thing it lacks: stopping a running job. It cannot kill a thread,
    so cancelling (a cold shutdown) asks every running job to hand itself back (`HandedBack`)."""

    stopping = threading.Event()  # one worker per process

    def terminate_job(self, pid: int | None, signal: int | None = None) -> None:
        self.stopping.set()


@dataclass(eq=False)  # compared by identity
class _Call:
    sample: np.ndarray
    timestep: np.ndarray
    text: np.ndarray
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    output: np.ndarray | None = None
    error: BaseException | None = None
    jobs: int = 1  # how many jobs shared the UNet call that computed this one

    @property
    def key(self) -> tuple[Any, ...]:
        return self.sample.shape[1:], self.text.shape[1:], self.sample.dtype, self.text.dtype


class Batcher:
    """Gathers concurrent UNet calls from the threads that are members, and runs them as one call."""

    def __init__(self, unet: UnetCall, max_wait: float = 0.1, max_rows: int | None = None) -> None:
        self.unet = unet
        self.max_wait = max_wait
        self.max_rows = max_rows  # the most UNet batch rows one call may have (a TensorRT profile's bound)
        self._cond = threading.Condition()
        self._members: set[int] = set()  # threads between their first UNet call and their next other call
        self._waiting: list[_Call] = []
        self._running = False
        self.sizes: deque[int] = deque(maxlen=10_000)  # jobs per recent model call, for tests and benchmarks

    @property
    def waiting(self) -> int:
        """Calls waiting for their batch to run."""
        with self._cond:
            return len(self._waiting)

    def leave(self) -> None:
        with self._cond:
            self._members.discard(threading.get_ident())
            self._cond.notify_all()

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, int]:
        """The UNet's output for this thread's call, and how many jobs shared the model call."""
        call = _Call(sample, timestep, text)
        with self._cond:
            self._members.add(threading.get_ident())
            self._waiting.append(call)
            self._cond.notify_all()
            while not call.done.is_set() and call in self._waiting:
                if not self._running and self._ready():
                    batch, self._waiting, self._running = self._waiting, [], True
                    self._cond.notify_all()  # the calls taken stop waiting for a turn
                    break
                self._cond.wait(self._timeout())
            else:
                batch = []
        if batch:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.output is not None
        return call.output, call.jobs

    def _ready(self) -> bool:
        return len(self._waiting) >= len(self._members) or time.monotonic() >= self._deadline()

    def _deadline(self) -> float:
        return self._waiting[0].started + self.max_wait if self._waiting else float("inf")

    def _timeout(self) -> float | None:
        if self._running:
            return None  # notified when it ends
        return max(0.0, self._deadline() - time.monotonic())

    def _run(self, batch: list[_Call]) -> None:
        groups: dict[tuple[Any, ...], list[_Call]] = defaultdict(list)
        for call in batch:
            groups[call.key].append(call)
        for calls in groups.values():
            for chunk in _chunks(calls, self.max_rows):
                self._run_group(chunk)

    def _run_group(self, calls: list[_Call]) -> None:
        self.sizes.append(len(calls))
        try:
            output = self.unet(*(np.concatenate([getattr(c, name) for c in calls]) for name in _INPUTS))
        except Exception as exc:
            if len(calls) == 1:
                _finish(calls[0], error=exc)
                return
            for call in calls:  # alone, so the call that breaks the model fails only its own job
                self._run_group([call])
            return
        offsets = np.cumsum([len(c.sample) for c in calls])[:-1]
        for call, rows in zip(calls, np.split(output, offsets), strict=True):
            call.jobs = len(calls)
            _finish(call, output=rows)


_INPUTS = ("sample", "timestep", "text")


def _chunks(calls: list[_Call], max_rows: int | None) -> Iterator[list[_Call]]:
    """The calls in order, in runs of at most `max_rows` rows (a call larger than that runs alone)."""
    chunk: list[_Call] = []
    for call in calls:
        if chunk and max_rows is not None and sum(len(c.sample) for c in chunk) + len(call.sample) > max_rows:
            yield chunk
            chunk = []
        chunk.append(call)
    if chunk:
        yield chunk


def _finish(call: _Call, output: np.ndarray | None = None, error: BaseException | None = None) -> None:
    call.output, call.error = output, error
    call.done.set()


class BatchedBackend:
    """A backend whose UNet calls are batched with the other threads' (`Batcher`); its other calls are the
    wrapped backend's. Timings and batch sizes are kept per thread, so each job reports its own."""

    def __init__(self, inner: Backend, max_wait: float = 0.1, stopping: threading.Event | None = None) -> None:
        self.inner = inner
        self.stopping = stopping or threading.Event()  # set: each job hands itself back at its next model call
        self.batcher = Batcher(inner.predict_noise, max_wait, getattr(inner, "max_unet_batch", None))
        self.edit_defaults = inner.edit_defaults
        self.facts: ModelFacts = inner.facts
        self.label: str | None = getattr(inner, "label", None)
        self._local = threading.local()

    @property
    def timings(self) -> dict[str, float]:
        """This thread's seconds per component since its job began (a batched UNet call counts in full
        for each job in it, waiting included: it is the time the job spent there)."""
        return self._state()[0]

    @property
    def shared(self) -> int:
        """The most jobs that shared one of this thread's UNet calls in its current job (1: it ran alone)."""
        return self._state()[1][0]

    @contextmanager
    def job(self) -> Iterator[None]:
        """One job's edit on this thread: fresh timings, and out of the batch when it ends, however it ends."""
        self._local.state = (defaultdict(float), [1])
        try:
            yield
        finally:
            self.batcher.leave()

    def _state(self) -> tuple[dict[str, float], list[int]]:
        if not hasattr(self._local, "state"):
            self._local.state = (defaultdict(float), [1])
        return self._local.state

    def _check(self) -> None:
        if self.stopping.is_set():
            raise HandedBack("the worker is stopping: the job goes back to the queue")

    def _timed(self, name: str, call: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
        self._check()
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.timings[name] += time.perf_counter() - start

    def encode_text(self, text: str) -> np.ndarray:
        self.batcher.leave()
        return self._timed("text_encoder", self.inner.encode_text, text)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        self.batcher.leave()
        return self._timed("vae_encoder", self.inner.encode_image, pixels)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        self.batcher.leave()
        return self._timed("vae_decoder", self.inner.decode, latents)

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        self._check()
        start = time.perf_counter()
        output, jobs = self.batcher(sample, timestep, text)
        timings, shared = self._state()
        timings["unet"] += time.perf_counter() - start
        shared[0] = max(shared[0], jobs)
        return output
