"""diffusers' own pipeline is the loop's reference for noisy samplers too: the seed's numpy noise on both sides."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.schedulers import scheduling_lcm

from core.edit import Tiling, generate, plan
from core.images import psnr
from core.params import EditParams
from export.reference import TorchEditPipeline, diffusers_generate, numpy_noise
from export.verify import PROBE_INSTRUCTION, PROBE_SEED, PROBE_SIZE, probe_image


@pytest.fixture(scope="module")
def torch_backend(tiny_checkpoint) -> TorchEditPipeline:
    return TorchEditPipeline.load(tiny_checkpoint)


@pytest.mark.parametrize("scheduler", ["lcm", "euler-ancestral"])
def test_the_loop_over_torch_modules_gives_diffusers_image_with_fresh_noise_every_step(torch_backend, scheduler):
    # LCM's settings: few steps, low text guidance, image guidance 1 (still 3-way in diffusers' pipeline).
    params = EditParams(steps=4, guidance_scale=2.0, image_guidance_scale=1.0, scheduler=scheduler, seed=PROBE_SEED)
    params = params.resolve(torch_backend.edit_defaults)
    pixels = probe_image()
    expected = diffusers_generate(torch_backend, pixels, PROBE_INSTRUCTION, params, PROBE_SEED)
    layout = plan(torch_backend.facts, PROBE_SIZE, PROBE_SIZE, Tiling(size=PROBE_SIZE))
    got = generate(torch_backend, pixels, PROBE_INSTRUCTION, params, PROBE_SEED, layout)
    assert len(layout) == 1 and psnr(expected, got) >= 40.0


def test_numpy_noise_draws_from_the_generator_and_restores_diffusers_own_after():
    original = scheduling_lcm.randn_tensor
    with numpy_noise(np.random.default_rng(3)):
        drawn = scheduling_lcm.randn_tensor((2, 3), generator=None, device="cpu").numpy()
    np.testing.assert_array_equal(drawn, np.random.default_rng(3).standard_normal((2, 3), dtype=np.float32))
    assert scheduling_lcm.randn_tensor is original
