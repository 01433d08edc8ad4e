"""Warm-up: a model is served only once it has loaded and run one edit, so a worker that cannot run a model
never takes that model's jobs (they stay queued for a worker that can).

`probe` runs before the worker takes any job: each model is loaded and warmed up in a forked process (the
main process must not hold ONNX Runtime sessions across Celery's fork), within ITSD_WARM_UP_TIMEOUT. A
model that fails is not registered and its queue is not consumed; a worker left with no model exits with
every reason. The pool processes then load and warm up again, so their first job pays no start-up cost;
that second load also fills caches once (a TensorRT engine is built by the probe, not by N processes at once).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from core.edit import Backend, Tiling, edit_image
from core.params import EditParams

if TYPE_CHECKING:
    from worker.jobs import ModelSpec

log = logging.getLogger(__name__)
_WARM_UP = EditParams(steps=1, seed=0)


def warm_up(backend: Backend, tiling: Tiling) -> None:
    """A one-step edit of one native tile (the shape every large photo's tiles have)."""
    from PIL import Image

    side = backend.facts.tile_size
    edit_image(backend, Image.new("RGB", (side, side), (128, 128, 128)), "warm up", _WARM_UP, tiling)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _probe_one(spec: ModelSpec, tiling: Tiling, send: Connection) -> None:
    try:
        backend = spec.load()
        warm_up(backend, tiling)
        outcome = {"label": getattr(backend, "label", None)}
    except BaseException as exc:  # whatever stops the model from running is the reason to report
        outcome = {"error": describe(exc)}
    send.send_bytes(json.dumps(outcome).encode())


def probe(models: dict[str, ModelSpec], tiling: Tiling, timeout: float) -> tuple[dict[str, str], dict[str, str | None]]:
    """Load and warm up each model in a forked process: the reason each model that failed did, by name, and
    what runs each model that passed (its backend's label: "openvino bf16", once the bf16 gate has spoken)."""
    context = multiprocessing.get_context("fork")
    failures: dict[str, str] = {}
    labels: dict[str, str | None] = {}
    for name, spec in models.items():
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_probe_one, args=(spec, tiling, send), name=f"warm-up {name}")
        start = time.monotonic()
        process.start()
        send.close()
        try:
            if not receive.poll(timeout):
                failures[name] = f"the warm-up did not finish within {timeout:g} s (ITSD_WARM_UP_TIMEOUT)"
            elif "error" in (outcome := json.loads(receive.recv_bytes())):
                failures[name] = outcome["error"]
            else:
                labels[name] = outcome["label"]
        except EOFError:  # the process died without a word: a crash in native code, or the OOM killer
            process.join(5)
            failures[name] = f"the warm-up process died (exit code {process.exitcode})"
        finally:
            receive.close()
            if process.is_alive():
                process.kill()
            process.join()
        if name not in failures:
            log.info("model %s passed its warm-up (loaded, one edit) in %.1f s", name, time.monotonic() - start)
    return failures, labels
