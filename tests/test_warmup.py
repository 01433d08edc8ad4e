"""Warm-up (worker/warmup.py): each model is loaded and run once in a forked process before a worker serves it."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from core.edit import Tiling
from core.errors import InvalidModel
from core.standin import StandInModel
from worker.jobs import ModelSpec
from worker.warmup import probe


def spec(name: str, load) -> ModelSpec:
    return ModelSpec(name, f"{name}-1", "stand-in", load)


def cannot_load() -> StandInModel:
    raise InvalidModel("unet.onnx: ONNX Runtime cannot load it")


def crashes() -> StandInModel:
    os._exit(3)  # as a segfault in native code or the OOM killer would end it: no exception, no word


def hangs() -> StandInModel:
    time.sleep(60)
    return StandInModel()


@pytest.mark.parametrize(
    ("load", "reason"),
    [
        (cannot_load, "InvalidModel: unet.onnx: ONNX Runtime cannot load it"),
        (lambda: StandInModel(transform=lambda x: np.full_like(x, np.nan)), "InvalidOutput: "),  # NaN weights
        (crashes, "the warm-up process died (exit code 3)"),
        (hangs, "the warm-up did not finish within 1 s (ITSD_WARM_UP_TIMEOUT)"),
    ],
)
def test_probe_names_each_model_that_cannot_run_and_why(load, reason):
    start = time.monotonic()
    failures, labels = probe({"good": spec("good", StandInModel), "bad": spec("bad", load)}, Tiling(), timeout=1)
    assert list(failures) == ["bad"] and failures["bad"].startswith(reason)
    assert labels == {"good": None}  # a stand-in names no runtime
    assert time.monotonic() - start < 10  # a hung warm-up is killed at its timeout


def test_probe_loads_nothing_into_the_calling_process():
    loaded = []
    assert probe({"good": spec("good", lambda: loaded.append(1) or StandInModel())}, Tiling(), timeout=10)[0] == {}
    assert loaded == []  # the load ran in the forked process: no sessions cross Celery's fork
