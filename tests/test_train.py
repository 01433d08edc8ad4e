"""`itsd train`: conv_in widening, conditioning dropout, config loading, and short real training runs on a
tiny model and a tiny dataset (input = a gradient image, target = its inverse or a blur of it)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFilter

from core.params import EDIT_DEFAULTS_FILE, read_edit_defaults
from training.config import ConfigError, TrainConfig, load_config

INVERT_PARAPHRASES = ["Invert the colors", "Make a negative of this image", "Swap every color for its opposite"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run makes its own Accelerator; forget the process-wide state between tests."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=1, unet_in_channels=4)


def gradient_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    a, b = rng.random(3), rng.random(3)
    pixels = (a * x[..., None] + b * y[..., None]) / np.maximum(a + b, 1e-6) * 255
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict in the low-level schema: 8 training rows (6 invert, 2 blur) and 2 validation rows."""
    import datasets

    def rows(seeds: range) -> dict[str, list]:
        table = {"input_image": [], "instruction": [], "ground_truth_image": [], "task": []}
        for seed in seeds:
            image = gradient_image(seed)
            blur = seed % 4 == 3
            target = image.filter(ImageFilter.GaussianBlur(3)) if blur else Image.fromarray(255 - np.asarray(image))
            table["input_image"].append(image)
            table["ground_truth_image"].append(target)
            table["instruction"].append("blur the image" if blur else "invert the colors")
            table["task"].append("blur" if blur else "invert")
        return table

    features = datasets.Features(
        {
            "input_image": datasets.Image(),
            "instruction": datasets.Value("string"),
            "ground_truth_image": datasets.Image(),
            "task": datasets.Value("string"),
        }
    )
    out = tmp_path_factory.mktemp("data") / "pairs"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(range(8)), features=features),
            "validation": datasets.Dataset.from_dict(rows(range(100, 102)), features=features),
        }
    ).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("instructions")
    (folder / "invert.txt").write_text("# paraphrases\n" + "\n".join(INVERT_PARAPHRASES) + "\n")
    return folder


def tiny_config(checkpoint: Path, data: Path, out: Path, **changes: object) -> TrainConfig:
    base = dict(
        pretrained=str(checkpoint),
        dataset=str(data),
        output_dir=str(out),
        resolution=64,
        train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        gradient_checkpointing=False,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_rows=2,
    )
    return TrainConfig(**{**base, **changes})


# ---------------------------------------------------------------- model surgery and per-step helpers


def test_widened_sd_unet_computes_exactly_what_the_sd_unet_did_when_the_extra_channels_are_zero(sd_checkpoint):
    from diffusers import UNet2DConditionModel

    from training.models import widen_conv_in

    sd = UNet2DConditionModel.from_pretrained(sd_checkpoint, subfolder="unet").eval()
    widened = widen_conv_in(copy.deepcopy(sd)).eval()

    assert widened.config.in_channels == 8 and widened.conv_in.in_channels == 8
    assert torch.equal(widened.conv_in.bias, sd.conv_in.bias)
    assert torch.equal(widened.conv_in.weight[:, :4], sd.conv_in.weight)
    assert not widened.conv_in.weight[:, 4:].any()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, sd.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        expected = sd(latents, timesteps, text).sample
        got = widened(torch.cat([latents, torch.zeros_like(latents)], dim=1), timesteps, text).sample
    assert torch.equal(got, expected)


def test_conditioning_dropout_drops_text_image_and_both_in_the_reference_proportions():
    from training.objective import conditioning_dropout

    n, p = 200_000, 0.05
    text, image = torch.ones(n, 2, 3), torch.ones(n, 4, 1, 1)
    null_text = torch.zeros(1, 2, 3)
    text, image = conditioning_dropout(text, image, null_text, p, torch.Generator().manual_seed(0))
    text_dropped = (text == 0).all(dim=(1, 2))
    image_dropped = (image == 0).all(dim=(1, 2, 3))

    assert abs(text_dropped.float().mean().item() - 2 * p) < 0.004
    assert abs(image_dropped.float().mean().item() - 2 * p) < 0.004
    assert abs((text_dropped & image_dropped).float().mean().item() - p) < 0.003
    assert abs((~text_dropped & ~image_dropped).float().mean().item() - (1 - 3 * p)) < 0.004
    assert set(text.unique().tolist()) == {0.0, 1.0}  # whole samples, never partial


def test_conditioning_dropout_with_probability_zero_keeps_everything():
    from training.objective import conditioning_dropout

    text, image = torch.randn(64, 2, 3), torch.randn(64, 4, 2, 2)
    got_text, got_image = conditioning_dropout(text, image, torch.zeros(1, 2, 3), 0.0, torch.Generator())
    assert torch.equal(got_text, text) and torch.equal(got_image, image)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_training_target_follows_the_schedulers_prediction_type(kind):
    from diffusers import DDPMScheduler

    from training.objective import training_target

    scheduler = DDPMScheduler(prediction_type=kind)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    expected = {"epsilon": noise, "sample": latents, "v_prediction": scheduler.get_velocity(latents, noise, t)}[kind]
    assert torch.equal(training_target(scheduler, latents, noise, t), expected)


def test_an_unknown_prediction_type_is_refused_by_name():
    from types import SimpleNamespace

    from training.objective import training_target

    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"))
    with pytest.raises(ValueError, match="'flow'"):
        training_target(scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_input_error_weighting_scores_the_identity_edit_1_on_every_sample_whatever_the_damage():
    from training.objective import sample_weights

    target = torch.randn(3, 4, 8, 8)
    damage = torch.tensor([1.0, 0.1, 0.0]).view(3, 1, 1, 1)  # dark photo, mild blur, an untouched flat crop
    inputs = target + damage * torch.randn(3, 4, 8, 8)
    floor = TrainConfig().input_error_floor
    weights = sample_weights("input_error", target, inputs, floor)
    identity = (inputs - target).pow(2).mean((1, 2, 3)) * weights
    assert torch.allclose(identity[:2], torch.ones(2))  # each task counts by the share of its damage undone
    assert weights[2] == 1.0 / floor  # a sample with nothing to undo is capped, not infinite
    raised = sample_weights("input_error", target, inputs, 0.5)  # a higher floor caps the mild blur too
    assert raised[0] == weights[0] and torch.equal(raised[1:], torch.tensor([2.0, 2.0]))
    capped = sample_weights("input_error", target, inputs, floor, 0.5)  # a ceiling lifts the dark photo to 2
    assert capped[0] == 2.0 and torch.equal(capped[1:], weights[1:])
    assert torch.equal(sample_weights("uniform", target, inputs, floor), torch.ones(3))
    with pytest.raises(ConfigError, match="loss_weighting must be one of uniform, input_error"):
        TrainConfig(loss_weighting="psnr")
    with pytest.raises(ConfigError, match="input_error_floor must be above 0"):
        TrainConfig(input_error_floor=0.0)
    with pytest.raises(ConfigError, match="input_error_ceiling must be 0"):
        TrainConfig(input_error_floor=0.1, input_error_ceiling=0.05)


def test_task_weights_give_each_task_its_share_however_many_rows_it_has():
    from training.pairs import row_weights

    tasks = ["deblur"] * 6 + ["denoise"] * 2
    weights = row_weights(tasks, {"deblur": 1.0, "denoise": 3.0})
    assert weights[:6].sum() == pytest.approx(0.25) and weights[6:].sum() == pytest.approx(0.75)
    assert row_weights(tasks, {}).tolist() == [1 / 8] * 8
    with pytest.raises(ConfigError, match="denoise"):
        row_weights(tasks, {"deblur": 1.0})
    with pytest.raises(ConfigError, match="derain"):
        row_weights(tasks, {"deblur": 1.0, "denoise": 1.0, "derain": 1.0})


def test_instructions_are_drawn_from_the_task_paraphrases_when_a_templates_file_exists(dataset, templates):
    from training.pairs import PairDataset, load_rows

    rows, _ = load_rows(TrainConfig(dataset=str(dataset), instructions_dir=str(templates)))
    pairs = PairDataset(rows, TrainConfig(resolution=32, instructions_dir=str(templates)), tokenizer=None)
    rng = np.random.default_rng(0)
    invert_draws = {pairs.pair(0, rng)[2] for _ in range(40)}
    assert invert_draws == set(INVERT_PARAPHRASES)
    assert {pairs.pair(3, rng)[2] for _ in range(5)} == {"blur the image"}  # no blur.txt: the row's own text
    original, edited, _ = pairs.pair(0, rng)
    assert original.size == edited.size == (32, 32)


def test_word_dropout_keeps_a_random_ordered_subset_of_the_words_and_never_empties_the_instruction(dataset, templates):
    from training.pairs import PairDataset, drop_words, load_rows

    text = "Swap every color for its opposite"
    rng = np.random.default_rng(0)
    draws = [drop_words(text, 0.5, rng) for _ in range(200)]
    for draw in draws:  # the kept words, in their order
        kept = iter(text.split())
        assert draw and all(word in kept for word in draw.split())
    assert len(set(draws)) > 20 and text in draws
    assert {len(d.split()) for d in draws} >= {1, 6}
    assert drop_words(text, 0.0, rng) == text and drop_words("Deblur", 0.9, rng) == "Deblur"
    cfg = TrainConfig(resolution=32, instructions_dir=str(templates), instruction_word_dropout=0.5)
    rows, _ = load_rows(TrainConfig(dataset=str(dataset), instructions_dir=str(templates)))
    pairs = PairDataset(rows, cfg, tokenizer=None)
    assert len({pairs.pair(0, rng)[2] for _ in range(40)} - set(INVERT_PARAPHRASES)) > 5
    assert pairs.pair(0, None)[2] == "invert the colors"  # no rng (validation): the row's own text, whole
    with pytest.raises(ConfigError, match=r"instruction_word_dropout must be in \[0, 1\)"):
        TrainConfig(instruction_word_dropout=1.0)


def test_inserted_words_are_unheard_vocabulary_words_between_the_kept_ones(dataset, templates, tiny_checkpoint):
    from transformers import CLIPTokenizer

    from training.pairs import PairDataset, insert_words, load_rows, unheard_words

    tokenizer = CLIPTokenizer.from_pretrained(tiny_checkpoint, subfolder="tokenizer")
    unheard = unheard_words(tokenizer, INVERT_PARAPHRASES)
    assert len(unheard) > 10_000 and {"rain", "cartoon", "storm"} <= set(unheard)
    assert not {"invert", "colors", "negative", "opposite", "the", "a"} & set(unheard)
    assert all(word.isalpha() and word.isascii() and len(word) >= 3 for word in unheard)

    rng = np.random.default_rng(0)
    text = "Swap every color for its opposite"
    draws = [insert_words(text, 3, unheard, rng) for _ in range(200)]
    assert {len(d.split()) - len(text.split()) for d in draws} == {0, 1, 2, 3}
    for draw in draws:  # the text's words, in their order, with unheard ones between them
        rest = [word for word in draw.split() if word not in text.split()]
        assert [word for word in draw.split() if word in text.split()] == text.split() and set(rest) <= set(unheard)
    assert insert_words(text, 0, unheard, rng) == text

    cfg = TrainConfig(resolution=32, instructions_dir=str(templates), instruction_word_insertion=2)
    rows, _ = load_rows(TrainConfig(dataset=str(dataset), instructions_dir=str(templates)))
    pairs = PairDataset(rows, cfg, tokenizer)
    assert "invert" not in pairs.unheard and "blur" in pairs.unheard  # blur has no templates file: heard of none
    drawn = {pairs.pair(0, rng)[2] for _ in range(40)}
    assert drawn - set(INVERT_PARAPHRASES) and set(INVERT_PARAPHRASES) & drawn
    with pytest.raises(ConfigError, match="instruction_word_insertion must be at least 0"):
        TrainConfig(instruction_word_insertion=-1)


def test_a_pair_is_cropped_with_the_same_box_on_input_and_target():
    from training.pairs import crop_pair

    wide = Image.fromarray(np.arange(40 * 100 * 3, dtype=np.uint32).reshape(40, 100, 3).astype(np.uint8))
    for seed in range(5):
        original, edited = crop_pair(wide, wide.copy(), 32, center=False, flip=True, rng=np.random.default_rng(seed))
        assert original.size == (32, 32) and np.array_equal(np.asarray(original), np.asarray(edited))


def test_a_shuffled_channel_order_is_one_order_shared_by_input_and_target_and_covers_all_six():
    from training.pairs import crop_pair

    rng = np.random.default_rng(0)
    original = np.zeros((32, 32, 3), dtype=np.uint8)
    original[..., 1], original[..., 2] = 100, 200
    edited = original // 2
    pair = Image.fromarray(original), Image.fromarray(edited)
    orders = set()
    for _ in range(60):
        a, b = crop_pair(*pair, 32, False, False, rng, shuffle_channels=True)
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(a // 2, b)  # the same order on both
        orders.add(tuple(a[0, 0]))
    assert orders == {(0, 100, 200), (0, 200, 100), (100, 0, 200), (100, 200, 0), (200, 0, 100), (200, 100, 0)}
    kept, _ = crop_pair(*pair, 32, True, False, None, shuffle_channels=True)
    assert np.array_equal(np.asarray(kept), original)  # no rng (validation): the photo's own colours


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    from training.train import make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails even where it is installed
    with pytest.raises(ConfigError, match="bitsandbytes"):
        make_optimizer(iter([torch.nn.Parameter(torch.zeros(1))]), TrainConfig(use_8bit_adam=True))


# ---------------------------------------------------------------- config


def test_an_unknown_key_in_the_toml_file_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("learning_rate = 1e-4\nlearnig_rate = 2e-4\n")
    with pytest.raises(ConfigError, match="learnig_rate"):
        load_config(path)


def test_an_unknown_key_in_set_is_an_error_that_names_it():
    with pytest.raises(ConfigError, match="resolutoin"):
        load_config(None, ["resolutoin=512"])


def test_a_value_of_the_wrong_type_is_an_error_that_names_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_train_steps = "many"\n')
    with pytest.raises(ConfigError, match="max_train_steps"):
        load_config(path)


def test_set_overrides_the_toml_file_and_flags_override_both(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'learning_rate = 1e-4\nresolution = 512\nmax_train_steps = 100\nmixed_precision = "bf16"\n'
        "task_weights = { deblur = 2, derain = 1 }\n"
    )
    config = load_config(
        path,
        ["resolution=128", "use_ema=false", "output_dir=runs/a b", "max_train_steps=50"],
        {"max_train_steps": 7, "dataset": None},
    )
    assert config.learning_rate == 1e-4  # from the file
    assert config.mixed_precision == "bf16"
    assert config.task_weights == {"deblur": 2.0, "derain": 1.0}
    assert config.resolution == 128 and config.use_ema is False and config.output_dir == "runs/a b"  # --set
    assert config.max_train_steps == 7  # the dedicated flag wins
    assert config.dataset == "" and config.seed == 42  # untouched defaults


def test_a_string_set_as_toml_prints_it_is_unquoted_and_a_bare_one_is_taken_verbatim():
    config = load_config(None, ['loss_weighting="input_error"', "mixed_precision='bf16'", 'output_dir=it\'s "a"'])
    assert (config.loss_weighting, config.mixed_precision) == ("input_error", "bf16")
    assert config.output_dir == 'it\'s "a"'


def test_the_defaults_are_the_reference_recipe_with_conditioning_dropout_on():
    config = TrainConfig()
    assert (config.resolution, config.train_batch_size, config.gradient_accumulation_steps) == (256, 2, 4)
    assert (config.max_train_steps, config.learning_rate, config.lr_scheduler) == (15000, 5e-5, "constant")
    assert config.conditioning_dropout_prob == 0.05 and config.use_ema and config.seed == 42


def test_a_timestep_floor_outside_the_schedule_is_refused(tiny_checkpoint, dataset, tmp_path):
    from training.train import train

    with pytest.raises(ConfigError, match="min_timestep must be at least 0"):
        TrainConfig(min_timestep=-1)
    with pytest.raises(ConfigError, match="min_timestep 1000 leaves no timestep"):
        train(tiny_config(tiny_checkpoint, dataset, tmp_path / "run", min_timestep=1000))


def test_a_later_timestep_bias_draws_the_latest_portion_that_many_times_as_often():
    from training.objective import draw_timesteps

    uniform = TrainConfig(min_timestep=40)
    drawn = draw_timesteps(4, 1000, uniform, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(40, 1000, (4,), generator=torch.Generator().manual_seed(3)))
    biased = TrainConfig(min_timestep=40, timestep_bias_multiplier=3.0, timestep_bias_portion=0.25)
    drawn = draw_timesteps(40000, 1000, biased, torch.Generator().manual_seed(0))
    assert drawn.min() >= 40 and drawn.max() <= 999
    late = (drawn >= 760).float().mean().item()  # the latest 240 of 960: weight 720 of 1440
    assert late == pytest.approx(0.5, abs=0.01)
    early = ((drawn >= 40) & (drawn < 280)).float().mean().item()  # as many timesteps, a third as often
    assert early == pytest.approx(late / 3, abs=0.01)
    with pytest.raises(ConfigError, match="timestep_bias_multiplier must be above 0"):
        TrainConfig(timestep_bias_portion=0.0)


def test_the_example_config_loads():
    config = load_config(Path(__file__).parents[1] / "training" / "configs" / "example.toml")
    assert config.resolution == 256 and config.task_weights


def test_the_cli_reports_an_unknown_key_in_one_line_and_exits_non_zero():
    from producer.cli import itsd

    result = CliRunner().invoke(itsd, ["train", "--set", "lerning_rate=1"])
    assert result.exit_code != 0 and "lerning_rate" in result.output


def test_the_cli_prints_the_resolved_config_as_toml_that_loads_back(tmp_path):
    from training.train_cli import train

    args = ["--print-config", "--max-train-steps", "9", "--set", "seed=7", "--set", "task_weights={a=1,b=2}"]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output
    path = tmp_path / "printed.toml"
    path.write_text(result.output)
    assert load_config(path) == TrainConfig(max_train_steps=9, seed=7, task_weights={"a": 1.0, "b": 2.0})


# ---------------------------------------------------------------- training runs


@pytest.mark.slow
def test_training_a_tiny_model_on_a_learnable_dataset_lowers_the_loss(tiny_checkpoint, dataset, tmp_path):
    from training.train import train

    out = tmp_path / "run"
    losses = train(tiny_config(tiny_checkpoint, dataset, out, max_train_steps=50, validation_steps=50))

    assert len(losses) == 50 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    grid = Image.open(out / "validation" / "step-000050.png")
    assert grid.size == (3 * 64, 2 * 64)  # input | output | target, one row per validation row
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-50"]  # checkpointing_steps=0: at the end


def test_gradient_accumulation_holds_every_trained_module_out_of_the_sync(tiny_checkpoint, dataset, tmp_path):
    """accelerate's no_sync takes one model; with the text encoder and task head trained there are three."""
    from training.train import train

    cfg = tiny_config(
        tiny_checkpoint,
        dataset,
        tmp_path / "run",
        max_train_steps=2,
        gradient_accumulation_steps=2,
        train_text_encoder=True,
        text_task_loss_weight=0.1,
    )
    losses = train(cfg)
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_parquet_dataset_in_the_hub_layout_trains_as_its_save_to_disk_twin(tiny_checkpoint, dataset, tmp_path):
    """`itsd prepare --format parquet` writes data/<split>-*.parquet; `itsd train` reads it as it reads arrow."""
    from datasets import load_from_disk

    from training.train import train

    for split, rows in load_from_disk(str(dataset)).items():
        (tmp_path / "parquet" / "data").mkdir(parents=True, exist_ok=True)
        rows.to_parquet(str(tmp_path / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    arrow = train(tiny_config(tiny_checkpoint, dataset, tmp_path / "arrow", max_train_steps=2))
    parquet = train(tiny_config(tiny_checkpoint, tmp_path / "parquet", tmp_path / "from-parquet", max_train_steps=2))
    assert parquet == arrow


def test_input_error_weighting_trains_on_losses_relative_to_the_identity_edit(tiny_checkpoint, dataset, tmp_path):
    from training.train import train

    cfg = tiny_config(tiny_checkpoint, dataset, tmp_path / "run", max_train_steps=3, loss_weighting="input_error")
    losses = train(cfg)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert 0.05 < losses[0] < 50  # an untrained UNet is within a few times the identity's error, not 1e-2 or 1e4


@pytest.mark.slow
def test_resuming_from_a_checkpoint_gives_the_losses_of_an_uninterrupted_run(tiny_checkpoint, dataset, tmp_path):
    from training.train import train

    changes = dict(
        max_train_steps=6,
        checkpointing_steps=2,
        checkpoints_total_limit=2,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        conditioning_dropout_prob=0.3,
        random_flip=True,
    )
    whole = train(tiny_config(tiny_checkpoint, dataset, tmp_path / "whole", **changes))
    kept = sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-6"]  # the total limit deleted checkpoint-2

    resumed = train(
        tiny_config(
            tiny_checkpoint, dataset, tmp_path / "resumed", **changes, resume=str(tmp_path / "whole" / "checkpoint-4")
        )
    )
    assert len(resumed) == 2
    np.testing.assert_allclose(resumed, whole[4:], rtol=0, atol=1e-6)
    from safetensors.torch import load_file

    final_whole = load_file(tmp_path / "whole" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    final_resumed = load_file(tmp_path / "resumed" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(final_whole[k], final_resumed[k], atol=1e-6) for k in final_whole)  # EMA too


def test_training_the_text_encoder_saves_it_in_final_and_resumes_exactly(tiny_checkpoint, dataset, tmp_path):
    from safetensors.torch import load_file

    from training.train import train

    changes = dict(max_train_steps=4, checkpointing_steps=2, train_text_encoder=True, conditioning_dropout_prob=0.3)
    whole = train(tiny_config(tiny_checkpoint, dataset, tmp_path / "whole", **changes))
    resumed = train(
        tiny_config(
            tiny_checkpoint, dataset, tmp_path / "resumed", **changes, resume=str(tmp_path / "whole" / "checkpoint-2")
        )
    )
    np.testing.assert_allclose(resumed, whole[2:], rtol=0, atol=1e-6)

    weights = "text_encoder/model.safetensors"
    base, final = load_file(tiny_checkpoint / weights), load_file(tmp_path / "whole" / "final" / weights)
    again = load_file(tmp_path / "resumed" / "final" / weights)
    assert any(not torch.equal(base[k], final[k]) for k in base)  # trained, not copied from the base
    assert all(torch.allclose(final[k], again[k], atol=1e-6) for k in final)  # its EMA resumed too


@pytest.mark.slow
def test_the_text_task_loss_keeps_the_tasks_apart_resumes_exactly_and_leaves_no_head_in_final(
    tiny_checkpoint, dataset, tmp_path
):
    from transformers import CLIPTextModel, CLIPTokenizer

    from training.pairs import tokenize
    from training.train import train

    changes = dict(max_train_steps=30, checkpointing_steps=20, train_text_encoder=True, use_ema=False)
    plain = train(tiny_config(tiny_checkpoint, dataset, tmp_path / "plain", **changes))
    whole = train(tiny_config(tiny_checkpoint, dataset, tmp_path / "whole", **changes, text_task_loss_weight=10.0))
    resumed = train(
        tiny_config(
            tiny_checkpoint,
            dataset,
            tmp_path / "resumed",
            **changes,
            text_task_loss_weight=10.0,
            resume=str(tmp_path / "whole" / "checkpoint-20"),
        )
    )
    np.testing.assert_allclose(resumed, whole[20:], rtol=0, atol=1e-6)  # the head was checkpointed too
    assert not np.allclose(plain, whole)  # the task loss moved the encoder, so the diffusion losses differ

    tokenizer = CLIPTokenizer.from_pretrained(tiny_checkpoint, subfolder="tokenizer")

    def cosine(run: Path) -> float:  # between the two tasks' instructions' mean token states
        encoder = CLIPTextModel.from_pretrained(run, subfolder="text_encoder")  # loads: no head in it
        with torch.no_grad():
            states = encoder(tokenize(tokenizer, ["invert the colors", "blur the image"]))[0].mean(1)
        return float(torch.nn.functional.cosine_similarity(states[0], states[1], dim=0))

    assert cosine(tmp_path / "whole" / "final") < cosine(tmp_path / "plain" / "final") - 0.2
    assert sorted(p.name for p in (tmp_path / "whole" / "final").iterdir()) == sorted(
        p.name for p in (tmp_path / "plain" / "final").iterdir()
    )


def test_the_text_task_loss_needs_a_trained_text_encoder_and_two_tasks(tiny_checkpoint, tmp_path):
    import datasets

    from training.train import train

    with pytest.raises(ConfigError, match="above 0 only with train_text_encoder"):
        TrainConfig(text_task_loss_weight=1.0)
    one_task = tmp_path / "one-task"
    image = gradient_image(0)
    datasets.Dataset.from_dict(
        {"input_image": [image], "instruction": ["invert"], "ground_truth_image": [image], "task": ["invert"]}
    ).save_to_disk(str(one_task))
    cfg = tiny_config(tiny_checkpoint, one_task, tmp_path / "run", train_text_encoder=True, text_task_loss_weight=1.0)
    with pytest.raises(ConfigError, match=r"needs rows of at least two tasks \(the dataset has \['invert'\]\)"):
        train(cfg)


def test_a_frozen_text_encoder_is_copied_unchanged_into_final(tiny_checkpoint, dataset, tmp_path):
    from safetensors.torch import load_file

    from training.train import train

    train(tiny_config(tiny_checkpoint, dataset, tmp_path / "run", max_train_steps=2))
    weights = "text_encoder/model.safetensors"
    base, final = load_file(tiny_checkpoint / weights), load_file(tmp_path / "run" / "final" / weights)
    assert all(torch.equal(base[k], final[k]) for k in base)
    assert not (tmp_path / "run" / "final" / EDIT_DEFAULTS_FILE).exists()  # none set, none in the base


def test_final_carries_the_configs_edit_defaults_else_the_bases(tiny_checkpoint, dataset, tmp_path):
    from training.train import train

    defaults = {"steps": 4.0, "guidance_scale": 1.0, "image_guidance_scale": 1.0}  # TOML tables load as floats
    train(tiny_config(tiny_checkpoint, dataset, tmp_path / "set", max_train_steps=1, edit_defaults=defaults))
    final = tmp_path / "set" / "final"
    assert json.loads((final / EDIT_DEFAULTS_FILE).read_text()) == {**defaults, "steps": 4}
    assert read_edit_defaults(final)["steps"] == 4  # a whole number, as checkpoints write it
    train(tiny_config(final, dataset, tmp_path / "again", max_train_steps=1))
    assert read_edit_defaults(tmp_path / "again" / "final") == {**defaults, "steps": 4}  # fine-tuned, kept


def test_final_records_the_tile_side_the_model_edits_in_as_its_unet_sample_size(tiny_checkpoint, dataset, tmp_path):
    from training.train import train

    def sample_size(run: str) -> int:
        return json.loads((tmp_path / run / "final" / "unet" / "config.json").read_text())["sample_size"]

    train(tiny_config(tiny_checkpoint, dataset, tmp_path / "trained", max_train_steps=1))
    train(tiny_config(tiny_checkpoint, dataset, tmp_path / "wider", max_train_steps=1, native_size=128))
    assert (sample_size("trained"), sample_size("wider")) == (64 // 8, 128 // 8)  # the training resolution, else


@pytest.mark.parametrize(
    ("defaults", "reason"),
    [({"steps": 2.5}, "steps must be an integer"), ({"strength": 0.5}, "unknown edit default.*strength")],
)
def test_bad_edit_defaults_are_refused_before_training(defaults, reason):
    with pytest.raises(ConfigError, match=reason):
        TrainConfig(edit_defaults=defaults)


def test_patches_can_be_cut_at_native_scale_instead_of_resizing_the_row():
    from training.pairs import crop_pair

    big = gradient_image(0, size=128)
    rng = np.random.default_rng(0)
    native, _ = crop_pair(big, big, 32, center=False, flip=False, rng=rng, resize=False)
    resized, _ = crop_pair(big, big, 32, center=True, flip=False, rng=None, resize=True)
    assert native.size == resized.size == (32, 32)
    step = np.abs(np.diff(np.asarray(native, dtype=np.float64), axis=1)).mean()
    assert step < 0.5 * np.abs(np.diff(np.asarray(resized, dtype=np.float64), axis=1)).mean()


def test_resume_latest_picks_the_newest_checkpoint_and_a_finished_run_trains_no_more(
    tiny_checkpoint, dataset, tmp_path, caplog
):
    from training.checkpoints import find_checkpoint
    from training.train import train

    out = tmp_path / "run"
    train(
        tiny_config(
            tiny_checkpoint,
            dataset,
            out,
            max_train_steps=2,
            checkpointing_steps=1,
            use_ema=False,
            gradient_checkpointing=True,
        )
    )
    assert find_checkpoint(out, "latest") == out / "checkpoint-2"
    assert find_checkpoint(tmp_path / "empty", "latest") is None
    finished = tiny_config(tiny_checkpoint, dataset, out, max_train_steps=2, use_ema=False, resume="latest")

    def warnings() -> list[str]:
        return [r.getMessage().split(" changed")[0] for r in caplog.records if r.name == "training.train"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert train(finished) == []
    assert warnings() == []  # only gradient checkpointing changed: the losses would be the same
    with caplog.at_level(logging.WARNING, logger="training.train"):
        cfg = tiny_config(tiny_checkpoint, dataset, out, max_train_steps=3, use_ema=False, learning_rate=1e-2)
        assert len(train(replace(cfg, resume="latest", seed=7))) == 1
    assert warnings() == ["resuming with learning_rate, seed"]


def test_training_from_sd_writes_a_final_folder_that_loads_as_an_8_channel_ip2p_pipeline(
    sd_checkpoint, dataset, tmp_path
):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from training.train import train

    out = tmp_path / "run"
    train(tiny_config(sd_checkpoint, dataset, out, max_train_steps=2))

    assert list((out / "final" / "unet").glob("*.safetensors"))
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out / "final")
    assert pipe.unet.config.in_channels == 8 and pipe.unet.conv_in.in_channels == 8
    edited = pipe(
        "invert the colors", image=gradient_image(0), num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert edited.size == (64, 64)
