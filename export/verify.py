"""Parity: the ONNX pipeline against the PyTorch one, same probes, same noise, deterministic scheduler.

Two probes: one tile, where the ONNX sessions in `core.edit`'s loop must give diffusers' own pipeline's
image; and several small tiles, where the same tiled loop over the ONNX sessions must give its image over
the checkpoint's torch modules (the path every large photo takes).
"""

from __future__ import annotations

import numpy as np

from core.edit import Backend, Tiling, generate, plan
from core.images import psnr
from core.manifest import Parity
from core.params import EditParams
from export.reference import TorchEditPipeline, diffusers_generate

THRESHOLD_DB = {"fp32": 40.0, "fp16": 25.0}  # under this, an export is refused
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; JSON has no infinity
PROBE_INSTRUCTION = "turn the sky into a sunset"
PROBE_SEED = 0
# 3-way guidance, whatever the model's defaults: the probe covers every path. Euler: no noise after the first draw.
PROBE_PARAMS = EditParams(
    steps=4, guidance_scale=7.0, image_guidance_scale=1.5, scheduler="euler", seed=PROBE_SEED
).resolve({})
PROBE_SIZE = 128  # px, square: one tile
TILED_PROBE = (128, 192, Tiling(size=64))  # height, width px, and tiles small enough for several of them


def probe_image(height: int = PROBE_SIZE, width: int = PROBE_SIZE) -> np.ndarray:
    """A deterministic photo-like probe: smooth gradients, a disc and stripes, in [-1, 1] NCHW."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float32)
    rgb = np.stack([x, y * (1 - disc) + disc, 0.5 + 0.5 * np.sin(12 * x) * (y > 0.7)])
    return (rgb * 2.0 - 1.0)[None].astype(np.float32)


def _tiled(backend: Backend, pixels: np.ndarray, tiling: Tiling) -> np.ndarray:
    layout = plan(backend.facts, pixels.shape[2], pixels.shape[3], tiling)
    return generate(backend, pixels, PROBE_INSTRUCTION, PROBE_PARAMS, PROBE_SEED, layout)


def _psnr(expected: np.ndarray, got: np.ndarray) -> float:
    return round(float(min(psnr(expected, got), PSNR_CAP_DB)), 3)


def measure(reference: TorchEditPipeline, candidate: Backend, dtype: str) -> Parity:
    pixels = probe_image()
    expected = diffusers_generate(reference, pixels, PROBE_INSTRUCTION, PROBE_PARAMS, PROBE_SEED)
    got = _tiled(candidate, pixels, Tiling(size=PROBE_SIZE))
    height, width, tiling = TILED_PROBE
    tiled_pixels = probe_image(height, width)
    tiled_expected, tiled_got = (_tiled(b, tiled_pixels, tiling) for b in (reference, candidate))
    return Parity(
        psnr_db=_psnr(expected, got),
        max_abs_diff=float(np.abs(expected.astype(np.int16) - got.astype(np.int16)).max()),
        steps=PROBE_PARAMS.steps,
        scheduler=str(PROBE_PARAMS.scheduler),
        size=(PROBE_SIZE, PROBE_SIZE),
        threshold_db=THRESHOLD_DB[dtype],
        tiled_psnr_db=_psnr(tiled_expected, tiled_got),
        tiles=len(plan(candidate.facts, height, width, tiling)),
    )
