"""The itsd-tiny recipe: a small InstructPix2Pix model made from scratch on CPUs by the project's own tools.

    python -m training.recipes.itsd_tiny --out DIR --seed 0

1. photos: fifteen real photos that ship inside pip packages (training.recipes.photos); HELD_OUT are never
   trained on: they are the test set.
2. `itsd prepare` twice: the training photos and the held-out ones, each crop degraded (low light, noise,
   rain, blur) or cartoonized by the built-in OpenCV teacher, every paraphrase kept per row; a quarter of the
   training restoration rows are untouched (`--untouched`: nothing of their task to undo, target = input).
3. the base checkpoint (training.tiny preset "itsd-tiny": random weights, the real CLIP tokenizer).
4. its VAE made a pixel autoencoder (training.autoencoder: set, not trained), scaled for the targets, and its
   UNet given a linear copy path (training.copy_path): before training it is the identity edit, and reads
   nothing from the noisy latents (pure noise at t = 999, where it is mostly trained).
5. `itsd train --config training/configs/itsd_tiny.toml`: UNet and text encoder together, the encoder kept apart
   by task (`text_task_loss_weight`) and taught that unheard words name none (`instruction_word_insertion`).
DIR/train/final is the checkpoint; DIR/recipe.json records the seed, the timings and the VAE's figures.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click
import numpy as np

from training.autoencoder import fit_scaling_factor, make_pixel_autoencoder, reconstruction_psnr
from training.copy_path import make_copy_path, mute_noisy_latents
from training.dataset import as_pil
from training.prepare_cli import echo_summary, untouched_option
from training.recipes.photos import PHOTOS, write_photos

HELD_OUT = ("chelsea", "coffee", "grace_hopper")  # a cat, a still life, a portrait: the test set
TASKS = ("low_light", "denoise", "derain", "deblur", "cartoonization")
CONFIG = Path(__file__).parents[1] / "configs" / "itsd_tiny.toml"
TRAIN_SAMPLES, TEST_SAMPLES = 80, 12  # crops per photo; each crop gets one task, drawn evenly
UNTOUCHED = 0.25  # share of restoration rows with nothing of their task to undo: the instruction must be read


def prepare(photos: Path, out: Path, seed: int, samples: int, split: str, untouched: float = 0.0) -> None:
    """Every crop of `photos` into one split of a dataset at OUT, each with one of TASKS and every paraphrase."""
    from training.prepare import DatasetSpec, build_dataset

    spec = DatasetSpec(
        clean=photos,
        tasks=dict.fromkeys(TASKS, 1.0),
        paraphrases="all",
        untouched=untouched,
        resolution=256,
        samples_per_image=samples,
        seed=seed,
        validation_fraction=0.0,
        test_fraction=1.0 if split == "test" else 0.0,
    )
    echo_summary(build_dataset(spec, out, overwrite=True, progress=False))


def build_autoencoder(base: Path, data: Path, held_out: Path) -> dict[str, float]:
    """Make the base checkpoint's VAE a pixel autoencoder (training.autoencoder), scaled for the training rows'
    targets, and give its UNet the copy path with the noisy latents muted (training.copy_path); returns the
    VAE's figures (reconstruction PSNR on the held-out targets)."""
    import datasets
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = make_pixel_autoencoder(AutoencoderKL.from_pretrained(base, subfolder="vae"))
    rows = datasets.load_from_disk(str(data))["train"]
    factor = fit_scaling_factor(vae, [np.asarray(as_pil(row["ground_truth_image"])) for row in rows])
    vae.save_pretrained(base / "vae", safe_serialization=True)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    mute_noisy_latents(make_copy_path(unet, scale=factor)).save_pretrained(base / "unet", safe_serialization=True)
    test = datasets.load_from_disk(str(held_out))["test"]
    targets = [np.asarray(as_pil(row["ground_truth_image"])) for row in test]
    return {"scaling_factor": factor, "held_out_psnr_db": reconstruction_psnr(vae, targets)}


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Working folder.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of every step.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of the training config.")
@untouched_option(UNTOUCHED)  # the training rows only: every test row keeps its edit
def main(out: Path, seed: int, overrides: tuple[str, ...], untouched: float) -> None:
    """Make itsd-tiny from scratch into OUT (OUT/train/final is the checkpoint)."""
    from training.config import load_config
    from training.tiny import build_tiny_checkpoint
    from training.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    record: dict[str, object] = {"seed": seed, "untouched": untouched, "held_out": list(HELD_OUT), "seconds": {}}
    seconds: dict[str, float] = record["seconds"]  # type: ignore[assignment]
    start = time.perf_counter()
    training_photos = [name for name in PHOTOS if name not in HELD_OUT]
    write_photos(training_photos, out / "photos" / "train")
    write_photos(HELD_OUT, out / "photos" / "test")
    prepare(out / "photos" / "train", out / "data-train", seed, TRAIN_SAMPLES, "train", untouched)
    prepare(out / "photos" / "test", out / "data-test", seed + 1, TEST_SAMPLES, "test")
    seconds["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    base = build_tiny_checkpoint(out / "base", seed=seed, preset="itsd-tiny")
    record["autoencoder"] = build_autoencoder(base, out / "data-train", out / "data-test")
    seconds["autoencoder"] = time.perf_counter() - start

    start = time.perf_counter()
    flags = {"pretrained": str(base), "dataset": str(out / "data-train"), "output_dir": str(out / "train")}
    losses = train(load_config(CONFIG, [f"seed={seed}", *overrides], flags))
    seconds["unet_and_text_encoder"] = time.perf_counter() - start
    record["final_loss"] = float(np.mean(losses[-100:])) if losses else None
    seconds["total"] = sum(seconds.values())
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    click.echo(json.dumps(record, indent=2))
    click.echo(f"checkpoint: {out / 'train' / 'final'}")


if __name__ == "__main__":
    main()
