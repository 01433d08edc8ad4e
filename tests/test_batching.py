"""Jobs batched together (worker/batching.py): concurrent edits share UNet calls, each gets its own rows
back, the same pixels as alone, and a job that breaks the model fails by itself."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import photo

from core.edit import edit_image
from core.images import psnr
from core.params import EditParams
from worker.batching import BatchedBackend, Batcher
from worker.openvino_runtime import OpenVinoEditPipeline
from worker.pipeline import OnnxEditPipeline


def rowwise(sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
    """A stand-in UNet whose every output row depends on its own input rows only."""
    if np.isnan(sample).any():
        raise RuntimeError("NaN in the batch")
    return sample[:, :4] * timestep[:, None, None, None] + text.mean(axis=(1, 2))[:, None, None, None]


def inputs(seed: int, rows: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((rows, 8, 4, 4), dtype=np.float32),
        np.full(rows, float(seed), np.float32),
        rng.standard_normal((rows, 5, 6), dtype=np.float32),
    )


class Gated:
    """A stand-in UNet whose first call holds until released, so the calls made meanwhile gather."""

    def __init__(self, unet=rowwise) -> None:
        self.unet = unet
        self.entered, self.release, self.first = threading.Event(), threading.Event(), True

    def __call__(self, *args: np.ndarray) -> np.ndarray:
        if self.first:
            self.first = False
            self.entered.set()
            self.release.wait(10)
        return self.unet(*args)

    def open_when(self, batcher: Batcher, waiting: int) -> None:
        self.entered.wait(10)
        while batcher.waiting < waiting:
            threading.Event().wait(0.01)
        self.release.set()


def gathered(batcher: Batcher, unet: Gated, count: int, work) -> list:
    """Run `work(index)` on `count` threads once their calls have gathered behind an opening call."""

    def opener() -> None:
        batcher(*inputs(99))
        batcher.leave()

    first = threading.Thread(target=opener)
    first.start()
    unet.entered.wait(10)
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(work, index) for index in range(count)]
        unet.open_when(batcher, count)
        first.join()
        return [future.result() for future in futures]


def test_concurrent_calls_share_one_model_call_and_each_gets_its_own_rows():
    unet = Gated()
    batcher = Batcher(unet, max_wait=5.0)  # no deadline fires: batches form because every member waits

    def job(index: int) -> list[tuple[np.ndarray, int]]:
        outputs = [batcher(*inputs(index * 10 + step)) for step in range(5)]
        batcher.leave()  # as a job's VAE decode does
        return outputs

    results = gathered(batcher, unet, 4, job)
    for index, steps in enumerate(results):
        for step, (output, jobs) in enumerate(steps):
            assert np.array_equal(output, rowwise(*inputs(index * 10 + step))) and jobs == 4
    assert list(batcher.sizes) == [1, 4, 4, 4, 4, 4]  # the opener, then 20 calls in 5 model calls


def test_a_call_that_breaks_the_model_fails_alone_and_its_batch_mates_get_their_rows():
    unet = Gated()
    batcher = Batcher(unet, max_wait=5.0)

    def job(index: int) -> np.ndarray | str:
        sample, timestep, text = inputs(index)
        if index == 1:
            sample[0, 0, 0, 0] = np.nan
        try:
            return batcher(sample, timestep, text)[0]
        except RuntimeError as exc:
            return str(exc)

    results = gathered(batcher, unet, 3, job)
    assert results[1] == "NaN in the batch"
    for index in (0, 2):
        assert np.array_equal(results[index], rowwise(*inputs(index)))
    assert list(batcher.sizes) == [1, 3, 1, 1, 1]  # the opener; the three together; then each alone


def test_a_call_of_another_shape_runs_in_its_own_batch_and_max_rows_bounds_a_call():
    unet = Gated()
    batcher = Batcher(unet, max_wait=5.0, max_rows=6)

    def job(index: int) -> np.ndarray:
        sample, timestep, text = inputs(index)
        if index == 3:
            sample = np.ascontiguousarray(np.concatenate([sample, sample], axis=2))  # a taller tile
        output = batcher(sample, timestep, text)[0]
        assert np.array_equal(output, rowwise(sample, timestep, text))
        return output

    gathered(batcher, unet, 4, job)
    assert batcher.sizes[0] == 1 and sorted(list(batcher.sizes)[1:]) == [1, 1, 2]  # 3 rows a call: 2 calls a batch


def test_a_lone_member_is_not_kept_waiting_by_one_that_left():
    batcher = Batcher(rowwise, max_wait=5.0)
    left = threading.Event()

    def other() -> None:
        batcher(*inputs(1))
        batcher.leave()  # what its VAE decode does
        left.set()

    thread = threading.Thread(target=other)
    thread.start()
    left.wait(10)
    thread.join()
    output, jobs = batcher(*inputs(2))  # would wait for the deadline (5 s) if `other` were still a member
    assert jobs == 1 and np.array_equal(output, rowwise(*inputs(2)))


PARAMS = [EditParams(steps=3, seed=1), EditParams(steps=3, seed=2), EditParams(steps=2, seed=3, guidance_scale=4)]


def edits_alone_and_batched(pipeline) -> tuple[list, list, BatchedBackend]:
    side = pipeline.facts.tile_size
    images = [photo(side, side, seed=1), photo(side * 2, side, seed=2), photo(side, side, seed=3)]
    alone = [edit_image(pipeline, image, "Derain", params) for image, params in zip(images, PARAMS, strict=True)]
    batched = BatchedBackend(pipeline, max_wait=5.0)
    batched.batcher.unet = gate = Gated(pipeline.predict_noise)  # the first UNet call waits for the others

    def job(index: int):
        with batched.job():
            edit = edit_image(batched, images[index], "Derain", PARAMS[index])
            return edit, batched.shared, dict(batched.timings)

    with ThreadPoolExecutor(len(images)) as pool:
        futures = [pool.submit(job, index) for index in range(len(images))]
        gate.open_when(batched.batcher, len(images) - 1)
        return alone, [future.result() for future in futures], batched


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_batched_jobs_give_the_pixels_they_give_alone(tiny_artifacts, tmp_path, runtime):
    pipeline = (
        OnnxEditPipeline(tiny_artifacts)
        if runtime == "onnxruntime"
        else OpenVinoEditPipeline(tiny_artifacts, "fp32", tmp_path)
    )
    alone, batched, backend = edits_alone_and_batched(pipeline)
    for one, (together, shared, timings) in zip(alone, batched, strict=True):
        assert together.seed == one.seed and together.tiles == one.tiles
        assert psnr(np.asarray(together.image), np.asarray(one.image)) >= 60
        assert shared >= 2 and timings["unet"] > 0 and timings["vae_decoder"] > 0
    assert max(backend.batcher.sizes) == 3  # a wide image's two tiles and two square ones, one call
