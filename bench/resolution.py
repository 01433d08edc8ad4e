"""Full resolution: time and memory from 0.25 to 24 MP, and what tiles do to quality, in one run.

    python bench/resolution.py [--sizes 0.25,1,4,12,24] [--quality-mp 12] [--figure FILE] [--sd15-tile] [--workdir DIR]

prints one JSON line:
- `sizes`: per megapixel count, a photo-like image of aspect 3:2 edited with the bundled itsd-tiny at its own
  settings (1 step, guidance 1/1) in a fresh process each: s/image, s/MP, tiles, peak RSS, and the same
  process's RSS just before the edit (the model and runtime), so the edit's own share shows;
  `sizes_tiles_alone` the same with no global view (each tile deciding alone, as before it), and
  `s_per_mp_vs_tiles_alone` the ratio per size;
- `quality`: each of itsd-tiny's held-out photos (never seen in training) mirrored out to 1920x1280 at its
  own scale (no photo of that size ships offline; enlarging one would leave no detail for a shrunk edit to
  lose), given sensor noise, "Remove the noise from this photo": PSNR against the clean photo of the noisy
  input, the default edit (global view and tiles), tiles alone, the `--max-side 512` edit, and naive tiles
  (non-overlapping 256-px pieces, each edited alone and pasted); `seam_ratio`: the error at tile-border rows
  and columns over the error elsewhere (1.0: no seam), for the default edit and the naive pieces;
- `whole_photo`: each held-out photo enlarged to `--quality-mp` (12) MP, per task (brightening the photo as it
  is and a darkened copy, denoising, deraining, deblurring, cartoonizing): PSNR against the clean photo (the
  teacher's cartoon for cartoonizing) of the default edit, tiles alone and the whole photo edited at native
  size and enlarged (`--max-side 256`: the whole-photo decision), the largest difference in mean luminance
  from that decision over 128-px blocks, and the default edit's seam ratio; `--figure FILE` writes the first
  photo's "brighten" edits, tiles alone beside the default, and a crop of each at full resolution where tiles
  alone stray most from the whole-photo edit, as a JPEG;
- `vae_tiling`: each VAE's round trip of a 768x512 photo in native tiles against one call on the whole
  image (how far per-tile GroupNorm statistics shift colour), for itsd-tiny and for the tiny test model's
  SD-like VAE (random weights: its round trip is no image, so its shift says little about a trained one);
- with `--sd15-tile`: seconds per UNet tile call (512 px, batch 3) of an SD1.5-size random model (slow: it
  builds and exports a 3.4 GB model first).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ITSD_PROVIDERS", "CPUExecutionProvider")

import numpy as np
from PIL import Image

from core.edit import Tiling, edit_image, generate, plan
from core.images import pad_to_multiple, psnr, to_model_input
from core.params import LATENT_MULTIPLE, EditParams
from core.tiles import Axis, Layout

INSTRUCTION = "Remove the noise from this photo"
NAIVE_PIECE = 256  # px: itsd-tiny's native tile
NOISE = {"photons": 60.0, "read_noise": 0.015}  # about the noisy input of issue 20's photo (21.6 dB)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_photo(megapixels: float) -> Image.Image:
    """A photo-like 3:2 image of about `megapixels` (speed does not depend on the content)."""
    from training.recipes.photos import PHOTOS

    width = round((megapixels * 1e6 * 1.5) ** 0.5)
    height = round(width / 1.5)
    base = Image.fromarray(PHOTOS["coffee"]())
    return base.resize((width, height), Image.Resampling.BILINEAR)


def child(megapixels: float, artifacts: str, overview: bool) -> None:
    """One size in a fresh process, so its peak RSS is its own; with the global view or tiles alone."""
    from worker.pipeline import OnnxEditPipeline

    backend = OnnxEditPipeline(Path(artifacts))
    edit_image(backend, Image.new("RGB", (256, 256)), INSTRUCTION, EditParams(seed=0))  # warm-up: one tile
    image = test_photo(megapixels)
    before = current_rss_mb()
    start = time.perf_counter()
    edit = edit_image(backend, image, INSTRUCTION, EditParams(seed=0), Tiling(overview=overview))
    seconds = time.perf_counter() - start
    pixels = image.size[0] * image.size[1]
    print(
        json.dumps(
            {
                "size": list(image.size),
                "megapixels": round(pixels / 1e6, 2),
                "s_per_image": round(seconds, 2),
                "s_per_mp": round(seconds / (pixels / 1e6), 3),
                "tiles": edit.tiles,
                "rss_before_edit_mb": round(before, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        )
    )


def seam_ratio(output: np.ndarray, clean: np.ndarray, borders: tuple[list[int], list[int]]) -> float:
    """Mean error on the rows and columns next to tile borders over the mean error elsewhere."""
    error = np.abs(output.astype(np.float64) - clean.astype(np.float64)).mean(axis=2)
    near = np.zeros(error.shape, dtype=bool)
    rows, columns = borders
    for r in rows:
        near[max(r - 1, 0) : r + 1, :] = True
    for c in columns:
        near[:, max(c - 1, 0) : c + 1] = True
    return round(float(error[near].mean() / error[~near].mean()), 3)


def layout_borders(layout: Layout, scale: int) -> tuple[list[int], list[int]]:
    def edges(axis: Axis) -> list[int]:
        inner = [s for s in axis.starts[1:]] + [s + axis.size for s in axis.starts[:-1]]
        return sorted({e * scale for e in inner})

    return edges(layout.rows), edges(layout.columns)


def naive_pieces(backend, noisy: Image.Image, params: EditParams) -> np.ndarray:
    out = np.zeros((noisy.height, noisy.width, 3), dtype=np.uint8)
    for top in range(0, noisy.height, NAIVE_PIECE):
        for left in range(0, noisy.width, NAIVE_PIECE):
            box = (left, top, min(left + NAIVE_PIECE, noisy.width), min(top + NAIVE_PIECE, noisy.height))
            piece = edit_image(backend, noisy.crop(box), INSTRUCTION, params).image
            out[box[1] : box[3], box[0] : box[2]] = np.asarray(piece)
    return out


def quality(artifacts: Path, name: str) -> dict:
    from training.degrade import sensor_noise
    from training.recipes.photos import PHOTOS
    from worker.pipeline import OnnxEditPipeline

    backend = OnnxEditPipeline(artifacts)
    photo = PHOTOS[name]()
    clean = np.pad(photo, ((0, 1280 - photo.shape[0]), (0, 1920 - photo.shape[1]), (0, 0)), mode="symmetric")
    rng = np.random.default_rng(0)
    noisy = sensor_noise(clean.astype(np.float32) / 255.0, NOISE, rng)
    noisy_image = Image.fromarray(np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8))
    params = EditParams(seed=0)
    tiled = edit_image(backend, noisy_image, INSTRUCTION, params)
    alone = edit_image(backend, noisy_image, INSTRUCTION, params, Tiling(overview=False))
    shrunk = edit_image(backend, noisy_image, INSTRUCTION, EditParams(seed=0, max_side=512))
    naive = naive_pieces(backend, noisy_image, params)
    padded = pad_to_multiple(noisy_image, noisy_image.size, LATENT_MULTIPLE)
    layout = plan(backend.facts, padded.shape[0], padded.shape[1])
    naive_borders = (list(range(NAIVE_PIECE, 1280, NAIVE_PIECE)), list(range(NAIVE_PIECE, 1920, NAIVE_PIECE)))
    return {
        "photo": f"{name} ({photo.shape[1]}x{photo.shape[0]}) mirrored out to 1920x1280",
        "psnr_db": {
            "noisy_input": round(psnr(np.asarray(noisy_image), clean), 2),
            "tiled_default": round(psnr(np.asarray(tiled.image), clean), 2),
            "tiles_alone": round(psnr(np.asarray(alone.image), clean), 2),
            "max_side_512": round(psnr(np.asarray(shrunk.image), clean), 2),
            "naive_tiles": round(psnr(naive, clean), 2),
        },
        "tiles": tiled.tiles,
        "seam_ratio": {
            "tiled_default": seam_ratio(np.asarray(tiled.image), clean, layout_borders(layout, 1)),
            "naive_tiles": seam_ratio(naive, clean, naive_borders),
        },
    }


DARKENED = {"gamma": 1.8, "gain": 0.3, "photons": 500.0, "read_noise": 0.005}  # a dark, slightly noisy photo
TASKS = {  # case -> (degradation of the clean photo, or None for the clean photo itself; instruction)
    "brighten_normal": (None, "Brighten this dark photo"),
    "brighten_darkened": ("low_light", "Brighten this dark photo"),
    "denoise": ("sensor_noise", "Remove the noise from this photo"),
    "derain": ("rain", "Remove the rain from this image"),
    "deblur": ("defocus_blur", "Sharpen this blurry photo"),
    "cartoonize": (None, "Cartoonize the image"),
}
BLOCK = 128  # px: the side of the blocks whose mean luminance must follow the whole photo's decision


def block_deviation(output: np.ndarray, reference: np.ndarray) -> float:
    """The largest difference in mean luminance (levels of 255) over BLOCK-px blocks."""
    weights = np.array([0.299, 0.587, 0.114])
    difference = (output.astype(np.float64) - reference.astype(np.float64)) @ weights
    rows, columns = difference.shape[0] // BLOCK, difference.shape[1] // BLOCK
    blocks = difference[: rows * BLOCK, : columns * BLOCK].reshape(rows, BLOCK, columns, BLOCK).mean(axis=(1, 3))
    return round(float(np.abs(blocks).max()), 2)


def side_by_side(left: np.ndarray, right: np.ndarray, whole: np.ndarray, path: Path, width: int = 2400) -> None:
    """The README's figure, as a JPEG `width` px wide: the two outputs next to each other, shrunk, and below
    them the same crop of each at full resolution around the block where `left` strays most from `whole`."""
    weights = np.array([0.299, 0.587, 0.114])
    difference = np.abs((left.astype(np.float64) - whole.astype(np.float64)) @ weights)
    rows, columns = difference.shape[0] // BLOCK, difference.shape[1] // BLOCK
    blocks = difference[: rows * BLOCK, : columns * BLOCK].reshape(rows, BLOCK, columns, BLOCK).mean(axis=(1, 3))
    row, column = np.unravel_index(int(blocks.argmax()), blocks.shape)
    half = width // 2
    crop_h = half * 2 // 3
    top = int(np.clip(row * BLOCK + BLOCK // 2 - crop_h // 2, 0, left.shape[0] - crop_h))
    start = int(np.clip(column * BLOCK + BLOCK // 2 - half // 2, 0, left.shape[1] - half))
    gap = np.full((left.shape[0], left.shape[1] // 100, 3), 255, np.uint8)
    pair = Image.fromarray(np.concatenate([left, gap, right], axis=1))
    pair = pair.resize((width, round(pair.height * width / pair.width)), Image.Resampling.LANCZOS)
    crops = [Image.fromarray(a[top : top + crop_h, start : start + half]) for a in (left, right)]
    sheet = Image.new("RGB", (width, pair.height + 8 + crop_h), "white")
    sheet.paste(pair, (0, 0))
    for index, crop in enumerate(crops):
        sheet.paste(crop.resize((half - 4, crop_h), Image.Resampling.LANCZOS), (index * (half + 4), pair.height + 8))
    sheet.save(path, quality=88)


def whole_photo(
    artifacts: Path, name: str, megapixels: float, figure: Path | None = None, tasks: tuple[str, ...] = tuple(TASKS)
) -> dict:
    """One held-out photo enlarged to `megapixels`, per task: the new path (global view + tiles), tiles alone,
    and the whole photo at native size enlarged (`--max-side` the tile), against the clean photo (cartoonize:
    against the teacher's cartoon of it), and how far each strays from the whole-photo edit in any block. The
    tiled pass runs once: tiles alone are its output, the new path its merge with the view (as `generate`)."""
    from core.edit import CallCounter, sample
    from core.images import to_uint8
    from core.overview import global_view, merge
    from training.degrade import DEGRADATIONS
    from training.recipes.photos import PHOTOS
    from training.teachers import BUILTIN_TEACHERS
    from worker.pipeline import OnnxEditPipeline

    backend = OnnxEditPipeline(artifacts)
    photo = PHOTOS[name]()
    scale = (megapixels * 1e6 / (photo.shape[0] * photo.shape[1])) ** 0.5
    size = (round(photo.shape[1] * scale), round(photo.shape[0] * scale))
    clean = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
    params = EditParams(seed=0).resolve(backend.edit_defaults)
    side = backend.facts.tile_size
    rows = {}
    for case in tasks:
        degradation, instruction = TASKS[case]
        source, target = clean, clean
        if degradation is not None:
            settings = (
                DARKENED if degradation == "low_light" else DEGRADATIONS[degradation].sample(np.random.default_rng(1))
            )
            damaged = DEGRADATIONS[degradation].apply(
                clean.astype(np.float32) / 255.0, settings, np.random.default_rng(0)
            )
            source = np.clip(np.round(damaged * 255.0), 0, 255).astype(np.uint8)
        if case == "cartoonize":
            target = BUILTIN_TEACHERS["cartoonization"](clean)
        image = Image.fromarray(source)
        whole = np.asarray(edit_image(backend, image, instruction, EditParams(seed=0, max_side=side)).image)
        pixels = to_model_input(pad_to_multiple(image, image.size, LATENT_MULTIPLE))
        layout = plan(backend.facts, pixels.shape[2], pixels.shape[3])
        start = time.perf_counter()
        tiled = sample(backend, pixels, layout, 1, instruction, params, 0, CallCounter(None, 0))
        view = global_view(pixels, side)
        view_layout = plan(backend.facts, view.shape[2], view.shape[3], Tiling(size=side))
        merged = merge(tiled.copy(), sample(backend, view, view_layout, 1, instruction, params, 0), side, params.detail)
        seconds = time.perf_counter() - start
        crop = (slice(0, size[1]), slice(0, size[0]))
        outputs = {"new": to_uint8(merged)[crop], "tiles_alone": to_uint8(tiled)[crop], "whole_enlarged": whole}
        rows[case] = {
            "psnr_db": {"input": round(psnr(source, target), 2)}
            | {key: round(psnr(value, target), 2) for key, value in outputs.items()},
            "block_deviation_from_whole": {key: block_deviation(value, whole) for key, value in outputs.items()},
            "seam_ratio_new": seam_ratio(
                outputs["new"], target, layout_borders(layout, backend.facts.vae_scale_factor)
            ),
            "seconds_new": round(seconds, 1),
        }
        if figure is not None and case == "brighten_normal":
            side_by_side(outputs["tiles_alone"], outputs["new"], whole, figure)
    return {"photo": f"{name} enlarged to {size[0]}x{size[1]}", "tasks": rows}


class VaeOnly:
    """A model's VAE alone through the loop: its UNet replaced by one that predicts the image latents as the
    clean sample (one step of a sample-predicting Euler schedule lands on them), so the edit is a round trip."""

    def __init__(self, backend) -> None:
        config = {"_class_name": "EulerDiscreteScheduler", "prediction_type": "sample"}
        self.facts = replace(backend.facts, scheduler_config=config)
        self.edit_defaults = {}
        self.encode_text, self.encode_image, self.decode = backend.encode_text, backend.encode_image, backend.decode

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        return sample[:, self.facts.latent_channels :] * np.float32(self.facts.latent_scaling_factor)


def vae_tiling(work: Path, itsd_tiny: Path) -> dict:
    """Per VAE: its round trip against the photo, and the tiled round trip against the whole-image one."""
    from export.exporter import export_checkpoint
    from training.recipes.photos import PHOTOS
    from training.tiny import build_tiny_checkpoint
    from worker.pipeline import OnnxEditPipeline

    test_model = work / "tiny-onnx"
    if not (test_model / "manifest.json").exists():
        build_tiny_checkpoint(work / "tiny-ckpt", seed=0)
        export_checkpoint(str(work / "tiny-ckpt"), test_model, verify_parity=False)
    image = np.asarray(Image.fromarray(PHOTOS["astronaut"]()).resize((768, 512), Image.Resampling.LANCZOS))
    pixels = to_model_input(image)
    params = EditParams(steps=1, guidance_scale=1.0, image_guidance_scale=1.0).resolve({})
    figures = {"image": "astronaut at 768x512, native 256-px tiles"}
    for name, artifacts in (("itsd-tiny", itsd_tiny), ("tiny test model (random weights, 1/8 latents)", test_model)):
        vae = VaeOnly(OnnxEditPipeline(artifacts))
        layout = plan(vae.facts, 512, 768)
        whole, tiled = (
            generate(vae, pixels, "", params, 0, grid) for grid in (plan(vae.facts, 512, 768, Tiling(768)), layout)
        )
        figures[name] = {
            "tiles": len(layout),
            "round_trip_psnr_db": round(psnr(whole, image), 2),
            "tiled_vs_whole_psnr_db": round(psnr(tiled, whole), 2),
            "tiled_vs_whole_mean_rgb_shift": [
                round(float(v), 2) for v in (tiled.astype(float) - whole).mean(axis=(0, 1))
            ],
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0.25,1,4,12,24")
    parser.add_argument("--sd15-tile", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--quality-mp", type=float, default=12.0, help="size of the per-task photos; 0: skip")
    parser.add_argument("--tasks", default=",".join(TASKS), help="the cases of --quality-mp to run")
    parser.add_argument("--figure", type=Path, default=None, help="write the first photo's brighten edits here")
    parser.add_argument("--child", nargs=3, metavar=("MP", "ARTIFACTS", "OVERVIEW"))
    args = parser.parse_args()
    if args.child:
        child(float(args.child[0]), args.child[1], args.child[2] == "1")
        return

    from core.settings import Settings
    from producer.models import BUNDLED_MODEL, artifacts_for
    from training.recipes.itsd_tiny import HELD_OUT
    from worker.pipeline import OnnxEditPipeline

    work = args.workdir or Path(tempfile.mkdtemp(prefix="itsd-bench-resolution-"))
    artifacts = artifacts_for(str(BUNDLED_MODEL), Settings.from_env(), lambda message: None)
    sizes, tiles_alone = [], []
    for megapixels in (float(s) for s in args.sizes.split(",")):
        for overview, rows in (("1", sizes), ("0", tiles_alone)):
            run = subprocess.run(
                [sys.executable, __file__, "--child", str(megapixels), str(artifacts), overview],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    per_mp = [s["s_per_mp"] for s in sizes if s["megapixels"] >= 1]
    result = {
        "bench": "resolution",
        "model": "itsd-tiny",
        "sizes": sizes,
        "sizes_tiles_alone": tiles_alone,
        "s_per_mp_vs_tiles_alone": [
            round(a["s_per_mp"] / b["s_per_mp"], 3) for a, b in zip(sizes, tiles_alone, strict=True)
        ],
        "s_per_mp_spread_1_to_24": round(max(per_mp) / min(per_mp) - 1, 3) if per_mp else None,
        "quality": {
            "noise": {"degradation": "sensor_noise", **NOISE},
            "params": EditParams(seed=0).resolve(OnnxEditPipeline(artifacts).edit_defaults).to_dict(),
            "photos": [quality(artifacts, name) for name in HELD_OUT],
        },
        "vae_tiling": vae_tiling(work, artifacts),
    }
    if args.quality_mp:
        result["whole_photo"] = {
            "megapixels": args.quality_mp,
            "photos": [
                whole_photo(
                    artifacts,
                    name,
                    args.quality_mp,
                    args.figure if name == HELD_OUT[0] else None,
                    tuple(args.tasks.split(",")),
                )
                for name in HELD_OUT
            ],
        }
    if args.sd15_tile:
        result["sd15_tile"] = sd15_tile(work)
    print(json.dumps(result))


def sd15_tile(work: Path) -> dict:
    from export.exporter import export_checkpoint
    from training.tiny import build_tiny_checkpoint
    from worker.pipeline import OnnxEditPipeline

    checkpoint, artifacts = work / "sd15-ckpt", work / "sd15-onnx"
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(checkpoint, preset="sd15")
    if not (artifacts / "manifest.json").exists():
        export_checkpoint(str(checkpoint), artifacts, verify_parity=False)
    backend = OnnxEditPipeline(artifacts)
    image = Image.fromarray(np.full((512, 896, 3), 120, np.uint8))  # two 512-px tiles
    params = EditParams(steps=2, seed=0, guidance_scale=7.0, image_guidance_scale=1.5)
    edit_image(backend, Image.new("RGB", (512, 512)), "x", EditParams(steps=1, seed=0))  # warm-up
    before = backend.timings["unet"]
    edit = edit_image(backend, image, "Cartoonize the image", params, Tiling())
    calls = edit.tiles * params.steps
    seconds = (backend.timings["unet"] - before) / calls
    return {"tile_px": 512, "tiles": edit.tiles, "steps": params.steps, "unet_s_per_tile_call": round(seconds, 2)}


if __name__ == "__main__":
    main()
