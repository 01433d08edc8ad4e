"""Inputs for the README's main command: itsd-tiny's held-out photos (never seen in training), one copy
per task, degraded the way that task undoes (the cartoonization copy stays clean), and a manifest that
gives each copy its own instruction.

    python -m training.recipes.demo OUT [--side 256] [--seed 0]

writes OUT/photos/<photo>-<task>.png and OUT/jobs.jsonl, for `itsd run OUT/jobs.jsonl --out EDITED`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from PIL import Image

from training.degrade import degrade
from training.recipes.itsd_tiny import HELD_OUT, TASKS
from training.recipes.photos import PHOTOS
from training.templates import rng_for

# One plain phrasing per task, as a user would type it.
INSTRUCTIONS = {
    "low_light": "Brighten this dark photo",
    "denoise": "Remove the noise from this photo",
    "derain": "Remove the rain from this photo",
    "deblur": "Make this blurry photo sharp",
    "cartoonization": "Cartoonize the image",
}


def centre_square(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    square = Image.fromarray(image[top : top + short, left : left + short])
    return np.asarray(square.resize((side, side), Image.Resampling.LANCZOS))


def write_demo_inputs(out: Path, side: int = 256, seed: int = 0) -> Path:
    """Write the photos and the manifest; returns the manifest's path."""
    (out / "photos").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in HELD_OUT:
        clean = centre_square(PHOTOS[name](), side)
        for task in TASKS:
            image = clean if task == "cartoonization" else degrade(clean, task, rng_for(seed, name, task))[0]
            path = out / "photos" / f"{name}-{task}.png"
            Image.fromarray(image).save(path)
            rows.append({"input": f"photos/{path.name}", "instruction": INSTRUCTIONS[task]})
    manifest = out / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--side", type=click.IntRange(64, 1024), default=256, show_default=True, help="Square side in px.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the degradations.")
def main(out: Path, side: int, seed: int) -> None:
    """Write itsd-tiny's demo inputs (held-out photos, one degraded copy per task) and their manifest."""
    click.echo(write_demo_inputs(out, side, seed))


if __name__ == "__main__":
    main()
