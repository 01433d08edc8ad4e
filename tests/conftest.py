"""Shared fixtures: a tiny InstructPix2Pix checkpoint and its ONNX export, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the Hub
os.environ.setdefault("ITSD_PROVIDERS", "CPUExecutionProvider")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ip2p", seed=0)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("artifacts") / "tiny-onnx"
    export_checkpoint(str(tiny_checkpoint), out)
    return out


def photo(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB test image (gradients plus a little texture)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200 + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
