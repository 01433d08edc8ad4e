"""itsd-tiny: its recipe's pieces (photos, held-out split, the preset, the unseen phrasings) and, once
committed, the checkpoint itself (size, format, loadability)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.params import read_edit_defaults
from training.recipes.itsd_tiny import HELD_OUT, TASKS
from training.recipes.itsd_tiny_check import BAR_DB, UNSEEN, VALIDATION, unseen_words
from training.recipes.photos import PHOTOS, write_photos
from training.templates import load_templates

MODEL = Path(__file__).parents[1] / "models" / "itsd-tiny"
MAX_BYTES = 30 * 1024 * 1024


def test_the_held_out_photos_are_real_sample_photos_and_leave_most_for_training():
    assert set(HELD_OUT) < set(PHOTOS) and len(PHOTOS) - len(HELD_OUT) >= 5


def test_sample_photos_load_offline_as_rgb_png_files(tmp_path):
    names = ["chelsea", "flower", "grace_hopper", "camera", "motorcycle"]  # camera: a grey photo
    paths = write_photos(names, tmp_path)
    assert [p.name for p in paths] == [f"{name}.png" for name in names]
    from PIL import Image

    assert all(Image.open(p).mode == "RGB" for p in paths)
    grey = np.asarray(Image.open(paths[3]))
    assert (grey[..., 0] == grey[..., 2]).all() and grey.std() > 10  # the photo in all three channels
    with pytest.raises(KeyError, match="astronaut"):
        write_photos(["lena"], tmp_path)


def test_every_task_has_an_unseen_phrasing_and_validation_phrasings_that_are_no_training_line_and_a_bar():
    assert set(UNSEEN) == set(BAR_DB) == set(TASKS)
    for task, text in UNSEEN.items():
        assert text.strip().lower() not in {line.strip().lower() for line in load_templates(task)}
        assert unseen_words(task, text), task  # each one also uses words no paraphrase of its task used
    assert set(VALIDATION) == set(TASKS)
    lines = {line.strip().lower() for task in TASKS for line in load_templates(task)} | {
        text.lower() for text in UNSEEN.values()
    }
    assert not lines & {text.lower() for texts in VALIDATION.values() for text in texts}


def test_the_itsd_tiny_preset_is_an_8_channel_ip2p_with_pixel_latents_predicting_the_clean_image(tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionInstructPix2PixPipeline

    from training.tiny import build_tiny_checkpoint

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        build_tiny_checkpoint(tmp_path / "base", preset="itsd-tiny")
    )
    assert pipe.unet.config.in_channels == 8 and pipe.vae_scale_factor == 1
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.scheduler.config.timestep_spacing == "trailing"  # never below t = 49 at 20 steps: min_timestep 40
    # Zero terminal SNR: training's t = 999 is pure noise, as a 1-step edit's start is; SD's schedule keeps 7% of
    # the target there, which the UNet reads (the mean colour) and sampling cannot give it.
    clean, noise = torch.ones(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(clean, noise, torch.tensor([999]))
    torch.testing.assert_close(noisy, noise)
    assert sum(p.stat().st_size for p in (tmp_path / "base").rglob("*") if p.is_file()) < MAX_BYTES


@pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="models/itsd-tiny is not committed yet")
def test_the_committed_model_is_a_safetensors_ip2p_checkpoint_under_30_mb():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(MODEL)
    assert pipe.unet.config.in_channels == 8
    defaults = read_edit_defaults(MODEL)  # unguided, as the recipe's config writes it: guidance pulls it apart
    assert (defaults["guidance_scale"], defaults["image_guidance_scale"]) == (1.0, 1.0)
    assert pipe.tokenizer("").input_ids == [49406, 49407]  # the real CLIP tokenizer: start and end tokens
    with torch.no_grad():
        assert torch.isfinite(pipe.text_encoder(torch.tensor([[49406, 49407]]))[0]).all()


@pytest.mark.slow
def test_the_check_scores_own_and_unseen_phrasings_per_task_and_draws_the_figure(tiny_artifacts, tmp_path):
    from click.testing import CliRunner

    from training.recipes.itsd_tiny import prepare
    from training.recipes.itsd_tiny_check import main

    write_photos(["chelsea", "coffee"], tmp_path / "photos")
    prepare(tmp_path / "photos", tmp_path / "data", seed=0, samples=12, split="test")
    result = CliRunner().invoke(
        main, [str(tmp_path / "data"), str(tiny_artifacts), "--out", str(tmp_path / "check"), "--rows-per-task", "1",
               "--steps", "1"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # a random-weight model misses the bar, as it should
    import json

    report = json.loads((tmp_path / "check" / "check.json").read_text())
    results, confusion = report["results"], report["confusion_gain_db"]
    assert [(r["task"], r["kind"]) for r in results] == [(t, k) for t in UNSEEN for k in ("own", "unseen")]
    assert [r["instruction"] for r in results if r["kind"] == "unseen"] == list(UNSEEN.values())
    assert {task: list(row) for task, row in confusion.items()} == {task: list(UNSEEN) for task in UNSEEN}
    for r in (r for r in results if r["kind"] == "unseen"):  # the unseen phrasing against the best other one
        assert r["gain_db"] == confusion[r["task"]][r["task"]]
        assert r["margin_db"] == r["gain_db"] - confusion[r["task"]][r["runner_up"]] and r["runner_up"] != r["task"]
        assert r["margin_db"] > 0 or not r["passed"]
    cosines = report["unseen_phrasing_cosine"]  # where the text encoder puts each unseen phrasing
    assert {task: list(row) for task, row in cosines.items()} == {task: list(UNSEEN) for task in UNSEEN}
    assert all(-1.0 <= c <= 1.0 for row in cosines.values() for c in row.values())
    nearest = report["validation_phrasing_nearest"]
    assert {task: len(near) for task, near in nearest.items()} == {task: len(t) for task, t in VALIDATION.items()}
    assert set().union(*nearest.values()) <= set(UNSEEN)
    markdown = (tmp_path / "check" / "check.md").read_text()
    assert "| rows | low_light | denoise" in markdown and "| phrasing | low_light | denoise" in markdown
    assert "Validation phrasings nearest their own task's paraphrases: " in markdown
    assert (tmp_path / "check" / "itsd-tiny.jpg").is_file()
