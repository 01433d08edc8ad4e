"""Where tiles go and how their outputs are blended: overlapping windows of one fixed shape over a 2-D grid.

Along each axis the tiles are spread evenly and the first and last are clamped to the edges, so every tile
has the same size (static shapes: TensorRT and OpenVINO compile one) and every cell is covered. A tile's
weight is 1 in its middle and ramps linearly down across each overlap with a neighbour, never to 0; the
weights are normalised per axis, so at every cell the weights of the tiles covering it sum to one, and a
side on the image's border is not tapered. Why ramps and not MultiDiffusion's flat average (a tile's
prediction enters or leaves at full weight at its edge: a step where tiles disagree) nor Mixture of
Diffusers' Gaussian (it never reaches the edge's weight it needs, and it down-weights the image's border,
which only one tile sees): a ramp is continuous across every tile edge, and its weight falls to near zero
exactly where a tile sees least context (its edges, where convolutions meet zero padding). 2-D weights
are products of 1-D ones, so they sum to one without a full-size weight buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

OVERLAP_FRACTION = 0.25  # of the tile side; Tiled Diffusion's advice is 1/4 to 1/3 of a 64-128 latent tile


@dataclass(frozen=True)
class Axis:
    """Tiles along one axis: `starts` of windows of `size` cells over `length` cells."""

    length: int
    size: int
    starts: tuple[int, ...]

    @classmethod
    def plan(cls, length: int, size: int, overlap: int) -> Axis:
        """At least `overlap` cells shared by neighbours; a tile longer than the axis shrinks to it."""
        if length <= 0 or size <= 0:
            raise ValueError(f"axis length and tile size must be positive, got {length} and {size}")
        size = min(size, length)
        if size == length:
            return cls(length, size, (0,))
        overlap = min(max(overlap, 0), size - 1)
        count = math.ceil((length - overlap) / (size - overlap))  # >= 2, as size < length
        return cls(length, size, tuple(round(i * (length - size) / (count - 1)) for i in range(count)))

    @cached_property
    def weights(self) -> np.ndarray:
        """float32 [tiles, size]: each tile's blend weight over its window; they sum to one at every cell."""
        raw = np.ones((len(self.starts), self.size), dtype=np.float64)
        cells = np.arange(self.size, dtype=np.float64)
        for i, start in enumerate(self.starts):
            before = self.starts[i - 1] + self.size - start if i > 0 else 0
            if before > 0:  # ramp up across the overlap with the tile before
                raw[i] = np.minimum(raw[i], (cells + 0.5) / before)
            after = start + self.size - self.starts[i + 1] if i < len(self.starts) - 1 else 0
            if after > 0:  # ramp down across the overlap with the tile after
                raw[i] = np.minimum(raw[i], (self.size - cells - 0.5) / after)
        total = np.zeros(self.length, dtype=np.float64)
        for start, weight in zip(self.starts, raw, strict=True):
            total[start : start + self.size] += weight
        normalised = np.stack([w / total[s : s + self.size] for s, w in zip(self.starts, raw, strict=True)])
        return np.clip(normalised, 0.0, 1.0).astype(np.float32)

    def scaled(self, factor: int) -> Axis:
        """The same windows at `factor` times the resolution (latent tiles -> pixel tiles)."""
        return Axis(self.length * factor, self.size * factor, tuple(s * factor for s in self.starts))


@dataclass(frozen=True)
class Tile:
    """One window: rows [top, top + height), columns [left, left + width), and its blend weights per axis."""

    top: int
    left: int
    row_weight: np.ndarray  # float32 [height]
    column_weight: np.ndarray  # float32 [width]

    @property
    def weight(self) -> np.ndarray:
        """float32 [height, width]; made when asked, so a 24 MP grid keeps no per-tile weight images."""
        return np.outer(self.row_weight, self.column_weight)

    def window(self, array: np.ndarray) -> np.ndarray:
        """This tile's view of an array whose last two axes are the grid's (height, width)."""
        return array[..., self.top : self.top + len(self.row_weight), self.left : self.left + len(self.column_weight)]


@dataclass(frozen=True)
class Layout:
    """A grid of tiles: rows x columns, each of one shape."""

    rows: Axis
    columns: Axis

    @classmethod
    def plan(cls, height: int, width: int, tile: int, overlap: int | None = None) -> Layout:
        """Tiles of `tile` x `tile` cells (each side at most the grid's) over a height x width grid."""
        overlap = round(tile * OVERLAP_FRACTION) if overlap is None else overlap
        return cls(Axis.plan(height, tile, overlap), Axis.plan(width, tile, overlap))

    def __len__(self) -> int:
        return len(self.rows.starts) * len(self.columns.starts)

    @property
    def tile(self) -> int:
        """The tile side asked for, in cells (along an axis shorter than it, tiles are cut to the axis)."""
        return max(self.rows.size, self.columns.size)

    @property
    def tiles(self) -> list[Tile]:
        return [
            Tile(top, left, row_weight, column_weight)
            for top, row_weight in zip(self.rows.starts, self.rows.weights, strict=True)
            for left, column_weight in zip(self.columns.starts, self.columns.weights, strict=True)
        ]

    def scaled(self, factor: int) -> Layout:
        return Layout(self.rows.scaled(factor), self.columns.scaled(factor))


class Canvas:
    """A float32 [1, channels, H, W] sum of weighted tile outputs; complete once every tile was added."""

    def __init__(self, layout: Layout, channels: int) -> None:
        self.array = np.zeros((1, channels, layout.rows.length, layout.columns.length), dtype=np.float32)

    def add(self, tile: Tile, output: np.ndarray) -> None:
        """Add one tile's output, float32 [channels, tile_h, tile_w]."""
        tile.window(self.array)[0] += output * tile.weight
