"""Image-quality figures for evaluation: PSNR, SSIM, and CLIP similarities when a CLIP model is at hand.

SSIM is Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, population
covariances, computed per RGB channel and averaged, borders of half a window left out of the mean:
the figures of `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255, channel_axis=-1)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.images import psnr

__all__ = ["ClipScorer", "ClipUnavailable", "load_clip", "psnr", "ssim"]

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # skimage's gaussian window: radius int(3.5 * sigma + 0.5) = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _blur(x: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(x, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)


def _ssim_channel(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a * mu_a
    var_b = _blur(b * b) - mu_b * mu_b
    cov = _blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = (SSIM_WINDOW - 1) // 2
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two same-shape images, HxW or HxWxC (channels averaged); 1.0 for identical images."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1]}x{a.shape[0]}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if a64.ndim == 2:
        return _ssim_channel(a64, b64, data_range)
    return float(np.mean([_ssim_channel(a64[..., c], b64[..., c], data_range) for c in range(a64.shape[-1])]))


class ClipUnavailable(Exception):
    """No CLIP model could be loaded from the given local folder; the reason is the message."""


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else 0.0


@dataclass
class ClipScorer:
    """CLIP image similarity and CLIP direction similarity (timbrooks' InstructPix2Pix metrics).

    Direction similarity in the paper is cos(img(out) - img(in), text(out caption) - text(in caption)).
    Our datasets carry instructions, not captions, so the text side here is the embedding of the
    instruction itself: cos(img(out) - img(in), text(instruction)). Compare figures only between runs
    measured this way, not with the paper's.
    """

    model: object  # transformers CLIPModel
    processor: object  # transformers CLIPProcessor

    def image_embedding(self, image: Image.Image) -> np.ndarray:
        import torch

        inputs = self.processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            features = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        return _as_vector(features)

    def text_embedding(self, text: str) -> np.ndarray:
        import torch

        inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            features = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        return _as_vector(features)

    def image_similarity(self, source: Image.Image, edited: Image.Image) -> float:
        """Cosine of the input's and the output's image embeddings: how much of the picture is kept."""
        return _cosine(self.image_embedding(source), self.image_embedding(edited))

    def direction_similarity(self, source: Image.Image, edited: Image.Image, instruction: str) -> float:
        """Cosine of the image change (out - in) with the instruction's text embedding (see the class note)."""
        change = self.image_embedding(edited) - self.image_embedding(source)
        return _cosine(change, self.text_embedding(instruction))


def _as_vector(features: object) -> np.ndarray:
    """transformers 4 returns a tensor, 5 may return a model output with `pooler_output`."""
    tensor = features if hasattr(features, "numpy") else features.pooler_output  # type: ignore[attr-defined]
    return tensor[0].float().numpy().astype(np.float64)


def load_clip(path: str | Path | None) -> ClipScorer:
    """A CLIP model and processor from a local folder only (never the Hub); ClipUnavailable says why not."""
    if path is None:
        raise ClipUnavailable("no --clip-model given")
    if not Path(path).is_dir():
        raise ClipUnavailable(f"{path} is not a local folder")
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClipUnavailable(f"cannot load a CLIP model from {path}: {first_line}") from None
    return ClipScorer(model, processor)
