"""Synthetic degradations of clean photos: the input half of a low-level pair; the clean photo is the target.

Every degradation is pure numpy/OpenCV and draws all its randomness from the generator it is given,
so a seed reproduces it. What each one may do is declared as data (`DEGRADATIONS[name].ranges`);
sizes are fractions of the image's short side so a 256-px crop and a 1024-px crop degrade alike.
Images are uint8 HxWx3 RGB in and out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

Params = dict[str, float]
# Per degradation, parameter ranges that replace the declared ones (`itsd prepare --degradation-range`).
Ranges = dict[str, dict[str, tuple[float, float]]]


@dataclass(frozen=True)
class Degradation:
    name: str
    task: str  # the instruction task whose templates describe undoing it
    ranges: dict[str, tuple[float, float]]  # each parameter is drawn uniformly from its range
    apply: Callable[[np.ndarray, Params, np.random.Generator], np.ndarray]  # float [0, 1] in and out

    def sample(self, rng: np.random.Generator, ranges: dict[str, tuple[float, float]] | None = None) -> Params:
        """One draw of every parameter, from `ranges` where it names the parameter, else the declared range."""
        chosen = {**self.ranges, **(ranges or {})}
        return {name: float(rng.uniform(*chosen[name])) for name in self.ranges}


def line_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised anti-aliased line through the centre: the path of a straight camera (or rain) motion."""
    size = max(3, length | 1)
    canvas = np.zeros((size, size), np.uint8)
    centre, half = size // 2, (length - 1) / 2
    dx, dy = half * np.cos(np.radians(angle_deg)), half * np.sin(np.radians(angle_deg))
    shift = 4  # sub-pixel end points (cv2 fixed point, 1/16 px)
    ends = [(round((centre + sx * dx) * 16), round((centre + sy * dy) * 16)) for sx, sy in ((-1, -1), (1, 1))]
    cv2.line(canvas, ends[0], ends[1], 255, 1, cv2.LINE_AA, shift)
    kernel = canvas.astype(np.float32)
    return kernel / kernel.sum()


def disk_kernel(radius: float) -> np.ndarray:
    """A normalised filled disk: the point-spread function of an out-of-focus lens."""
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = np.clip(radius + 0.5 - np.sqrt(x**2 + y**2), 0.0, 1.0).astype(np.float32)  # soft edge
    return kernel / kernel.sum()


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _short_side(x: np.ndarray) -> int:
    return min(x.shape[:2])


def _sensor(x: np.ndarray, photons: float, read_noise: float, rng: np.random.Generator) -> np.ndarray:
    """Shot noise (Poisson in the photon count, so its variance follows the signal) plus Gaussian read noise.
    Each channel has its own white-balance gain, as the red and blue channels of a real sensor do."""
    gains = rng.uniform(1.0, 2.0, size=3).astype(np.float32)  # fewer photons behind the boosted channels
    counts = photons / gains
    shot = rng.poisson(np.clip(x, 0, 1) * counts) / counts
    return shot + rng.normal(0.0, read_noise, x.shape) * gains


def rain(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    drops = (rng.random((h, w)) < p["density"]) * rng.uniform(0.6, 1.0, (h, w))
    length = max(5, round(p["length"] * _short_side(x)))
    streaks = _blur(drops.astype(np.float32), line_kernel(length, 90.0 + p["angle"])) * length
    streaks = np.clip(cv2.GaussianBlur(streaks, (0, 0), p["width"]) * 1.5, 0.0, 1.0)[..., None]
    hazy = x * (1 - p["haze"]) + p["haze"] * 0.8  # rain scatters light and lifts the blacks
    return 1.0 - (1.0 - hazy) * (1.0 - p["opacity"] * streaks)  # screen blend: streaks only brighten


def sensor_noise(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    return _sensor(x, p["photons"], p["read_noise"], rng)


# The least blur that still reads as blur (px), a floor under every range: small images, and milder ranges
# (`--degradation-range`) at 256 px, meet it first.
MIN_MOTION_PX, MIN_DEFOCUS_RADIUS_PX = 5, 2.0


def motion_blur(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    return _blur(x, line_kernel(max(MIN_MOTION_PX, round(p["length"] * _short_side(x))), p["angle"]))


def defocus_blur(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    return _blur(x, disk_kernel(max(MIN_DEFOCUS_RADIUS_PX, p["radius"] * _short_side(x))))


def low_light(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    dark = p["gain"] * np.power(x, p["gamma"])  # the tone curve compresses the shadows, the gain dims all
    return _sensor(dark, p["photons"], p["read_noise"], rng)


DEGRADATIONS: dict[str, Degradation] = {
    d.name: d
    for d in (
        Degradation(
            "rain",
            "derain",
            # density: streak seeds per pixel; length and width: of a streak; angle: degrees from vertical
            {
                "density": (0.002, 0.008),
                "length": (0.05, 0.15),
                "angle": (-20.0, 20.0),
                "width": (0.4, 1.0),
                "opacity": (0.5, 0.9),
                "haze": (0.0, 0.15),
            },
            rain,
        ),
        # photons: expected count at full white (fewer = noisier); read_noise: sigma in [0, 1] units
        Degradation("sensor_noise", "denoise", {"photons": (15.0, 200.0), "read_noise": (0.005, 0.03)}, sensor_noise),
        Degradation("motion_blur", "deblur", {"length": (0.02, 0.06), "angle": (0.0, 180.0)}, motion_blur),
        Degradation("defocus_blur", "deblur", {"radius": (0.006, 0.02)}, defocus_blur),
        Degradation(
            "low_light",
            "low_light",
            {"gamma": (1.4, 2.5), "gain": (0.1, 0.45), "photons": (200.0, 1000.0), "read_noise": (0.002, 0.01)},
            low_light,
        ),
    )
}
# Damage that also holds another task's: a low-light photo carries sensor noise, so denoising it has work to do.
ALSO_DAMAGES: dict[str, tuple[str, ...]] = {"low_light": ("denoise",)}
# Tasks that a synthetic dataset can hold, and the degradations (drawn evenly) that make their inputs.
TASK_DEGRADATIONS: dict[str, tuple[str, ...]] = {
    task: tuple(name for name, d in DEGRADATIONS.items() if d.task == task)
    for task in dict.fromkeys(d.task for d in DEGRADATIONS.values())
}


def check_ranges(ranges: Ranges) -> None:
    """Refuse, by name, a degradation or parameter that does not exist, or a range whose low end is above its high
    end (ValueError)."""
    for name, params in ranges.items():
        if name not in DEGRADATIONS:
            raise ValueError(f"no degradation {name!r}; choose from {', '.join(DEGRADATIONS)}")
        declared = DEGRADATIONS[name].ranges
        for param, (low, high) in params.items():
            if param not in declared:
                raise ValueError(f"{name} has no parameter {param!r}; it has {', '.join(declared)}")
            if low > high:
                raise ValueError(f"{name}.{param}: the range {low},{high} runs backwards")


def degrade(
    clean: np.ndarray, task: str, rng: np.random.Generator, ranges: Ranges | None = None
) -> tuple[np.ndarray, str, Params]:
    """A degraded copy of `clean` (uint8 RGB) for `task`; also which degradation and its parameters. `ranges`
    replaces declared parameter ranges (the same draws from the generator, so a seed still reproduces it)."""
    names = TASK_DEGRADATIONS[task]
    degradation = DEGRADATIONS[names[int(rng.integers(len(names)))]]
    params = degradation.sample(rng, (ranges or {}).get(degradation.name))
    out = degradation.apply(clean.astype(np.float32) / 255.0, params, rng)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8), degradation.name, params
