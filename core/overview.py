"""The whole photo's decision at full resolution: a global view, then the tiles' detail on top of it.

A tile never decides alone what an instruction means. An image of several tiles is also edited whole: shrunk
(aspect kept, with the filter `--max-side` uses) until its longest side is one tile, mirrored out to the latent
grid as any image is, and edited in one call of each model, as `--max-side TILE` would edit it. That view
decides the coarse scale: tone, colour, and whether to change at all. The tiled pass at the image's own size
brings everything finer. With T the tiled output, G the view's, D the view's shrink and U the enlargement back:

    correction = shrink(blur(G - D(T)), TOLERANCE)
    trust = detail * clip(1 - |correction| / FADE, 0, 1)        (the largest of the channels)
    out = U(trust) * (T + U(correction)) + (1 - U(trust)) * U(G)

- `blur` (a Gaussian of BLUR_SIGMA view pixels): the view's finest scale is where shrinking and the model's
  own rendering disagree at every edge; it is detail, the tiles' to decide.
- `shrink` (soft thresholding): where the two agree within TOLERANCE, the tiles' coarse scale stays. That
  much is the model's own jitter between scales, and on a local repair the tiles are the more exact; where
  they disagree by more (a tile brightened a dark corner the whole photo does not call dark), the view's
  decision is taken, less the tolerance.
- `trust`: a tile that decided otherwise made its detail under that decision too (its edge, its texture at
  its own gain), so where the correction is large the tiles' detail fades out, over FADE, into the view
  enlarged. `detail` (`--detail`, default 1) scales it for every pixel: 0 gives the view enlarged.
Measured on itsd-tiny (`bench/resolution.py`, docs/benchmarks.md): denoising keeps the tiles' gain, and a
12 MP "brighten" edit stays within a few levels of the whole-photo edit in every 128-px block, where tiles
alone went 60-111 levels off. A model that changes nothing changes nothing through the merge (G = D(T)).
Why not "hires fix" (a tiled img2img from the enlarged view): it reaches the output only through the noisy
latents, which a model may ignore (itsd-tiny's `conv_in` does, by construction), and it re-runs steps per
tile; this costs one tile and a few resizes, whatever the model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from core.params import LATENT_MULTIPLE

SHRINK = Image.Resampling.LANCZOS  # what `--max-side` shrinks with (core.images.pad_to_multiple)
ENLARGE = Image.Resampling.BICUBIC  # smooth and local
BLUR_SIGMA = 1.0  # view pixels
TOLERANCE = 4 / 127.5  # 4 levels of 255, in the model's [-1, 1] pixels
FADE = 16 / 127.5  # where the view corrects the tiles by this much more, their detail is gone too


def view_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) of an image of height x width shrunk so its longest side is `tile`, aspect kept."""
    scale = tile / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(array: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """float32 [C, H, W] -> [C, height, width], channel by channel (Pillow's float images: no rounding)."""
    return np.stack(
        [np.asarray(Image.fromarray(channel, mode="F").resize((width, height), resample)) for channel in array]
    )


def global_view(pixels: np.ndarray, tile: int) -> np.ndarray:
    """float32 [1, 3, H, W] -> [1, 3, h, w]: the whole image shrunk so its longest side is `tile`, its right and
    bottom mirrored out to the latent grid."""
    height, width = pixels.shape[2:]
    shrunk = resize(pixels[0], *view_size(height, width, tile), SHRINK)
    pad_y, pad_x = -shrunk.shape[1] % LATENT_MULTIPLE, -shrunk.shape[2] % LATENT_MULTIPLE
    return np.pad(shrunk, ((0, 0), (0, pad_y), (0, pad_x)), mode="symmetric")[None]


def merge(tiled: np.ndarray, whole: np.ndarray, tile: int, detail: float = 1.0) -> np.ndarray:
    """float32 [C, H, W] tiled output and [C, h, w] view output (still mirrored out) -> [C, H, W]: the view's
    coarse scale with the tiles' finer one, faded out where they decided otherwise (`detail` of it in all).
    Works in place on `tiled`."""
    height, width = tiled.shape[1:]
    small = view_size(height, width, tile)
    view = whole[:, : small[0], : small[1]]
    correction = _blur(view - resize(tiled, *small, SHRINK), BLUR_SIGMA)
    correction = np.sign(correction) * np.maximum(np.abs(correction) - TOLERANCE, 0.0)
    trust = np.clip(1.0 - np.abs(correction).max(axis=0, keepdims=True) / FADE, 0.0, 1.0) * np.float32(detail)
    # where the view trusts the tiles everywhere (a local repair), no pixel takes the enlarged view: skip it
    weight = resize(trust, height, width, ENLARGE)[0] if trust.min() < 1.0 else None
    for index, channel in enumerate(tiled):  # one full-size channel at a time
        channel += resize(correction[index : index + 1], height, width, ENLARGE)[0]
        if weight is not None:
            channel *= weight
            channel += (1.0 - weight) * resize(view[index : index + 1], height, width, ENLARGE)[0]
    return tiled


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of float32 [C, h, w] along both image axes, its edges mirrored."""
    radius = max(1, round(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    height, width = array.shape[1:]
    padded = np.pad(array, ((0, 0), (radius, radius), (radius, radius)), mode="symmetric")
    rows = sum(k * padded[:, i : i + height] for i, k in enumerate(kernel))
    return sum(k * rows[:, :, i : i + width] for i, k in enumerate(kernel))
