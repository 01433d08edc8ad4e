"""Synthetic probe photos, deterministic and torch-free: export's parity probe (`export.verify`) and the
worker's int8 calibration edits (`worker.int8`) use the same ones. Nothing is downloaded."""

from __future__ import annotations

import numpy as np
from PIL import Image

PROBE_SIZE = 128  # px, square: one tile of the tiny models


def probe_image(height: int = PROBE_SIZE, width: int = PROBE_SIZE) -> np.ndarray:
    """A deterministic photo-like probe: smooth gradients, a disc and stripes, in [-1, 1] NCHW."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float32)
    rgb = np.stack([x, y * (1 - disc) + disc, 0.5 + 0.5 * np.sin(12 * x) * (y > 0.7)])
    return (rgb * 2.0 - 1.0)[None].astype(np.float32)


def probe_photo(height: int = PROBE_SIZE, width: int = PROBE_SIZE) -> Image.Image:
    """`probe_image` as an 8-bit RGB photo, for `core.edit.edit_image`."""
    rgb = (probe_image(height, width)[0].transpose(1, 2, 0) + 1.0) * 127.5
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))
