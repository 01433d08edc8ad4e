"""Parity: the ONNX pipeline against diffusers' own, same probe, same noise, deterministic scheduler."""

from __future__ import annotations

import numpy as np

from core.edit import Backend
from core.images import psnr
from core.manifest import Parity
from core.params import EditParams

THRESHOLD_DB = {"fp32": 40.0, "fp16": 25.0}  # under this, an export is refused
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; JSON has no infinity
PROBE_INSTRUCTION = "turn the sky into a sunset"
PROBE_SEED = 0
# 3-way guidance, whatever the model's defaults: the probe covers every path. Euler: no noise after the first draw.
PROBE_PARAMS = EditParams(steps=4, guidance_scale=7.0, image_guidance_scale=1.5, scheduler="euler", seed=PROBE_SEED)


def probe_image(size: int = 128) -> np.ndarray:
    """A deterministic photo-like probe: smooth gradients, a disc and stripes, in [-1, 1] NCHW."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float32)
    rgb = np.stack([x, y * (1 - disc) + disc, 0.5 + 0.5 * np.sin(12 * x) * (y > 0.7)])
    return (rgb * 2.0 - 1.0)[None].astype(np.float32)


def measure(reference: Backend, candidate: Backend, dtype: str, size: int = 128) -> Parity:
    pixels = probe_image(size)
    expected, got = (b.generate(pixels, PROBE_INSTRUCTION, PROBE_PARAMS, PROBE_SEED) for b in (reference, candidate))
    return Parity(
        psnr_db=round(float(min(psnr(expected, got), PSNR_CAP_DB)), 3),
        max_abs_diff=float(np.abs(expected.astype(np.int16) - got.astype(np.int16)).max()),
        steps=PROBE_PARAMS.steps,
        scheduler=str(PROBE_PARAMS.scheduler),
        size=(size, size),
        threshold_db=THRESHOLD_DB[dtype],
    )
