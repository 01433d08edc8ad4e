"""`itsd evaluate` and its metrics: PSNR/SSIM on known cases, the identity baseline, both backends, grids."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage.metrics import structural_similarity

from producer.cli import itsd
from tests.conftest import photo
from training.evaluation_report import GRID_HEADER, GRID_TILE
from training.metrics import ClipUnavailable, load_clip, psnr, ssim

TASKS = ("derain", "denoise", "derain", "denoise")


def noisy(image: Image.Image, seed: int, sigma: float = 12.0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 rows of 64x64, two tasks, low-level schema, a DatasetDict with train and test splits."""
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    targets = [photo(64, 64, seed=i) for i in range(4)]
    columns = {
        "input_image": [noisy(t, seed=10 + i) for i, t in enumerate(targets)],
        "instruction": [f"Please {task} the image" for task in TASKS],
        "ground_truth_image": targets,
        "task": list(TASKS),
        "source": [f"photo{i}.png" for i in range(4)],
    }
    features = Features(
        {
            "input_image": ImageFeature(),
            "instruction": Value("string"),
            "ground_truth_image": ImageFeature(),
            "task": Value("string"),
            "source": Value("string"),
        }
    )
    split = Dataset.from_dict(columns, features=features)
    out = tmp_path_factory.mktemp("eval-data") / "lowlevel"
    DatasetDict({"train": split, "test": split}).save_to_disk(str(out))
    return out


def run(*args: object) -> object:
    return CliRunner().invoke(itsd, ["evaluate", *map(str, args)])


@pytest.fixture(scope="module")
def report(
    dataset: Path, tiny_artifacts: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("eval-out")
    result = run(
        dataset, "--model", f"onnx={tiny_artifacts}", "--model", f"torch={tiny_checkpoint}", "--out", out,
        "--steps", 2, "--scheduler", "euler", "--seed", 3, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_identical_images_have_infinite_psnr_and_ssim_one() -> None:
    image = np.asarray(photo(64, 48))
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0)


def test_a_uniform_shift_of_one_has_psnr_20_log10_255() -> None:
    image = np.asarray(photo(64, 48)).clip(0, 254)
    assert psnr(image, image + 1) == pytest.approx(20 * math.log10(255))


def test_ssim_matches_skimage_on_a_noisy_image() -> None:
    clean = np.asarray(photo(80, 64))
    degraded = np.asarray(noisy(photo(80, 64), seed=1, sigma=25))
    expected = structural_similarity(
        clean, degraded, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=255
    )
    assert ssim(clean, degraded) == pytest.approx(expected, abs=1e-3)


def test_clip_is_skipped_with_a_reason_when_no_local_model_is_given(tmp_path: Path) -> None:
    with pytest.raises(ClipUnavailable, match="no --clip-model"):
        load_clip(None)
    with pytest.raises(ClipUnavailable, match="cannot load"):
        load_clip(tmp_path)


def test_clip_similarities_run_on_a_tiny_local_clip_model(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from training.clip_vocab import write_clip_tokenizer_files

    vocab, merges = write_clip_tokenizer_files(tmp_path / "tokenizer")
    text = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    vision = {"image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text | small, vision_config=vision | small, projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer(str(vocab), str(merges), model_max_length=77),
    )
    processor.save_pretrained(tmp_path / "clip")

    scorer = load_clip(tmp_path / "clip")
    source, edited = photo(64, 64, seed=0), noisy(photo(64, 64, seed=0), seed=1)
    assert scorer.image_similarity(source, source) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scorer.direction_similarity(source, edited, "add noise") <= 1.0


def test_evaluate_reports_both_models_and_the_identity_baseline_per_task(report: Path) -> None:
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["models"]) == {"onnx", "torch"}
    assert metrics["models"]["onnx"]["backend"] == "onnx" and metrics["models"]["torch"]["backend"] == "torch"
    assert metrics["models"]["onnx"]["runtime"] == "onnxruntime CPUExecutionProvider"  # conftest's ITSD_RUNTIME
    assert metrics["models"]["torch"]["runtime"] == "torch cpu float32"
    assert metrics["params"]["seed"] == 3 and metrics["params"]["scheduler"] == "euler"
    ran = {"steps": 2, "guidance_scale": 7.0, "image_guidance_scale": 1.5}  # unset scales: the project's defaults
    assert all(params.items() >= ran.items() for params in metrics["params_by_model"].values())
    assert metrics["clip"].startswith("skipped:")
    assert set(metrics["tasks"]) == {"derain", "denoise"}
    for summary in metrics["tasks"].values():
        assert summary["count"] == 2 and summary["reference"] == "ground truth"
        assert {"psnr", "ssim"} <= set(summary["identity"])
        assert set(summary["models"]) == {"onnx", "torch"}
        for figures in summary["models"].values():
            assert figures["gain_db"] == pytest.approx(figures["psnr"] - summary["identity"]["psnr"])
    assert len(metrics["per_row"]) == 4


def test_the_markdown_table_has_a_row_per_task_and_model(report: Path) -> None:
    table = (report / "metrics.md").read_text()
    assert table.startswith("| task | model | PSNR | SSIM | input PSNR | input SSIM | gain dB |")
    for task in ("derain", "denoise"):
        for model in ("onnx", "torch"):
            assert sum(line.startswith(f"| {task} | {model} |") for line in table.splitlines()) == 1


def test_grids_have_a_column_per_model_plus_input_and_target(report: Path) -> None:
    for task in ("derain", "denoise"):
        with Image.open(report / "grids" / f"{task}.png") as grid:
            assert grid.size == ((2 + 2) * GRID_TILE, GRID_HEADER + 2 * GRID_TILE)


def test_onnx_and_torch_backends_score_the_same_model_alike(report: Path) -> None:
    for summary in json.loads((report / "metrics.json").read_text())["tasks"].values():
        assert abs(summary["models"]["onnx"]["psnr"] - summary["models"]["torch"]["psnr"]) < 0.5


def test_the_identity_baseline_is_the_psnr_of_input_and_target(report: Path, dataset: Path) -> None:
    from datasets import load_from_disk

    rows = load_from_disk(str(dataset))["test"]
    per_row = json.loads((report / "metrics.json").read_text())["per_row"]
    for figures in per_row:
        row = rows[figures["index"]]
        expected = psnr(np.asarray(row["input_image"]), np.asarray(row["ground_truth_image"]))
        assert figures["identity"]["psnr"] == pytest.approx(expected)
    derain = [f["identity"]["psnr"] for f in per_row if f["task"] == "derain"]
    summary = json.loads((report / "metrics.json").read_text())["tasks"]["derain"]
    assert summary["identity"]["psnr"] == pytest.approx(np.mean(derain))


def test_a_bad_model_path_exits_1_with_one_line(dataset: Path, tmp_path: Path) -> None:
    result = run(dataset, "--model", f"x={tmp_path / 'missing'}", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "missing" in result.output


def test_a_missing_split_exits_non_zero_listing_the_available_ones(
    dataset: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    result = run(dataset, "--model", tiny_checkpoint, "--split", "validation", "--out", tmp_path, "--quiet")
    assert result.exit_code != 0
    assert "validation" in result.output and "train, test" in result.output


def test_teacher_made_targets_are_reported_as_distances_to_the_teacher(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A cartoonization-schema Dataset (not a DatasetDict) is evaluated whole against the teacher's outputs."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from training.teachers import cartoon

    inputs = [photo(64, 64, seed=i) for i in range(2)]
    columns = {
        "original_image": inputs,
        "edit_prompt": ["Cartoonize the image"] * 2,
        "cartoonized_image": [Image.fromarray(cartoon(np.asarray(image))) for image in inputs],
        "task": ["cartoonization"] * 2,
    }
    features = Features(
        {
            "original_image": ImageFeature(),
            "edit_prompt": Value("string"),
            "cartoonized_image": ImageFeature(),
            "task": Value("string"),
        }
    )
    Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path / "cartoons"))
    result = run(
        tmp_path / "cartoons", "--model", f"tiny={tiny_artifacts}", "--out", tmp_path / "out", "--steps", 1, "--quiet"
    )
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "| cartoonization | tiny |" in table and "teacher output" in table
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["split"] == "all"


def test_task_filter_with_an_instruction_checks_one_phrasing_on_one_task(dataset: Path, tiny_artifacts: Path, tmp_path):
    text = "please remove the rain streaks from this picture"
    result = run(
        dataset, "--model", f"onnx={tiny_artifacts}", "--task", "derain", "--instruction", text, "--out", tmp_path,
        "--steps", 1, "--grid-rows", 0, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert list(report["tasks"]) == ["derain"] and report["rows"] == 2
    assert [row["instruction"] for row in report["per_row"]] == [text, text]
    assert "and 0 grid(s)" in result.output and not list((tmp_path / "grids").iterdir())  # --grid-rows 0: none


def test_a_task_the_split_lacks_exits_non_zero_naming_the_tasks_it_has(dataset: Path, tiny_artifacts: Path, tmp_path):
    result = run(dataset, "--model", tiny_artifacts, "--task", "sharpen", "--out", tmp_path, "--quiet")
    assert result.exit_code != 0 and "sharpen" in result.output and "derain" in result.output


def test_evaluate_models_is_the_library_behind_the_command(dataset: Path, tiny_artifacts: Path, tmp_path: Path):
    from core.params import EditParams
    from training.evaluate import EvaluationError, EvaluationSpec, evaluate_models

    text = "please remove the rain streaks from this picture"
    args = ["--task", "derain", "--instruction", text, "--steps", 1, "--seed", 5, "--quiet"]
    args += ["--runtime", "openvino", "--precision", "fp32"]
    assert run(dataset, "--model", f"onnx={tiny_artifacts}", *args, "--out", tmp_path / "command").exit_code == 0
    spec = EvaluationSpec(
        dataset,
        {"onnx": str(tiny_artifacts)},
        EditParams(steps=1, seed=5),
        tasks=("derain",),
        instruction=text,
        runtime="openvino",  # the command's --runtime; its default reads ITSD_RUNTIME, which conftest sets
        precision="fp32",
    )
    notes: list[str] = []
    report = evaluate_models(spec, tmp_path / "library", progress=False, report=notes.append)
    assert report == json.loads((tmp_path / "command" / "metrics.json").read_text())
    assert notes == ["CLIP similarity skipped: no --clip-model given"]
    with pytest.raises(EvaluationError, match=r"no rows of task\(s\) sharpen"):
        evaluate_models(replace(spec, tasks=("sharpen",)), tmp_path / "bad", progress=False)
    with pytest.raises(EvaluationError, match="--model broken="):
        evaluate_models(replace(spec, models={"broken": str(tmp_path)}), tmp_path / "bad", progress=False)


def test_an_artifact_folder_runs_on_the_runtime_asked_as_a_worker_would_and_the_report_says_which(
    dataset: Path, tiny_artifacts: Path, tmp_path: Path
) -> None:
    options = ("--steps", 1, "--limit", 1, "--grid-rows", 0, "--quiet", "--runtime", "openvino", "--precision", "fp32")
    result = run(dataset, "--model", f"a={tiny_artifacts}", "--out", tmp_path, *options)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "metrics.json").read_text())["models"]["a"]["runtime"] == "openvino fp32"
    assert "ran: a on openvino fp32" in result.output
