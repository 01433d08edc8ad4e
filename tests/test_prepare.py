"""`itsd prepare`: deterministic, aligned, split-safe instruction datasets from photos, pairs and degradations."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from datasets import load_dataset, load_from_disk
from PIL import Image
from skimage import data as skdata

from core.images import psnr
from producer.cli import itsd
from training.dataset import Crop, aligned_crop, split_of
from training.degrade import DEGRADATIONS, TASK_DEGRADATIONS, degrade
from training.templates import TASKS, load_templates, rng_for

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        image = image.resize((image.width // 4, image.height // 4))  # small: the tests stay fast
        image.save(folder / (f"{name}.png" if i % 2 else f"{name}.jpg"), quality=95)
    return folder


def prepare(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(itsd, ["prepare", *args, "--quiet", "--resolution", "64"])
    return result.exit_code, result.output


def rows(out: Path, split: str = "train") -> list[dict]:
    return list(load_from_disk(str(out))[split])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_each_task_ships_at_least_twenty_unique_paraphrases() -> None:
    for task in TASKS:
        templates = load_templates(task)
        assert len(templates) >= 20, task
        assert len({t.lower() for t in templates}) == len(templates), task


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_every_degradation_lowers_psnr_and_stays_uint8(name: str) -> None:
    clean = np.asarray(Image.fromarray(skdata.astronaut()).resize((128, 128)))
    degradation = DEGRADATIONS[name]
    for seed in range(3):
        rng = rng_for(seed, name)
        out = degradation.apply(clean.astype(np.float32) / 255.0, degradation.sample(rng), rng)
        degraded = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
        assert degraded.shape == clean.shape
        assert psnr(clean, degraded) < 30.0, (name, seed)


def test_a_degradation_is_reproducible_for_a_seed_and_differs_for_another() -> None:
    clean = np.asarray(Image.fromarray(skdata.chelsea()).resize((96, 64)))
    for task in TASK_DEGRADATIONS:
        first, name, params = degrade(clean, task, rng_for(1, "k"))
        again, _, _ = degrade(clean, task, rng_for(1, "k"))
        other, _, _ = degrade(clean, task, rng_for(2, "k"))
        assert first.dtype == np.uint8 and first.shape == clean.shape
        assert np.array_equal(first, again), task
        assert not np.array_equal(first, other), task
        assert set(params) == set(DEGRADATIONS[name].ranges)


def test_a_range_replaces_a_declared_one_and_leaves_the_other_parameters_draws_alone() -> None:
    clean = np.asarray(Image.fromarray(skdata.chelsea()).resize((256, 256)))
    ranges = {"motion_blur": {"length": (0.01, 0.03)}}
    for seed in range(20):
        _, name, plain = degrade(clean, "deblur", rng_for(seed, "k"))
        _, again, mild = degrade(clean, "deblur", rng_for(seed, "k"), ranges)
        assert again == name  # the same degradation is drawn
        if name == "motion_blur":
            assert 0.01 <= mild["length"] <= 0.03 and plain["length"] >= 0.02
            assert mild["angle"] == plain["angle"]  # one draw per parameter, in the declared order
        else:
            assert mild == plain


def test_an_aligned_crop_cuts_input_and_target_with_the_same_box() -> None:
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)
    target = 255 - source
    for seed in range(5):
        a, b = aligned_crop([source, target], Crop(48, "random", resize=True), np.random.default_rng(seed))
        assert a.shape == b.shape == (48, 48, 3)
        assert np.abs(255 - a.astype(int) - b.astype(int)).max() <= 1  # resampling is linear: still inverse
    a, b = aligned_crop([source, source.copy()], Crop(32, "random", resize=False), np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert any(np.array_equal(a, source[y : y + 32, x : x + 32]) for y in range(59) for x in range(119))


def test_a_crop_keeps_the_aspect_ratio_instead_of_squashing() -> None:
    image = np.zeros((200, 400, 3), np.uint8)
    yy, xx = np.mgrid[:200, :400]
    image[(yy - 100) ** 2 + (xx - 200) ** 2 <= 40**2] = 255  # a round marker in the middle
    (out,) = aligned_crop([image], Crop(100, "center"), np.random.default_rng(0))
    ys, xs = np.nonzero(out[..., 0] > 127)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert abs(height - width) <= 1 and abs(height - 40) <= 2  # scaled by 1/2 both ways: still a circle
    assert abs(ys.mean() - 49.5) < 1 and abs(xs.mean() - 49.5) < 1
    (whole,) = aligned_crop([image], Crop(100, "none"), np.random.default_rng(0))
    assert whole.shape == (100, 200, 3)


def test_splits_are_deterministic_and_follow_the_fractions() -> None:
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    keys = [f"photo_{i}" for i in range(2000)]
    first = [split_of(k, 0, fractions) for k in keys]
    assert first == [split_of(k, 0, fractions) for k in keys]
    assert first != [split_of(k, 1, fractions) for k in keys]
    assert 0.05 < first.count("test") / len(keys) < 0.15


def test_synthetic_preparation_is_deterministic_for_a_seed(photos: Path, tmp_path: Path) -> None:
    common = ["--clean", str(photos), "--task", "derain=2", "--task", "denoise", "--samples-per-image", "2"]
    assert prepare(str(tmp_path / "a"), *common, "--seed", "7")[0] == 0
    assert prepare(str(tmp_path / "b"), *common, "--seed", "7")[0] == 0
    assert prepare(str(tmp_path / "c"), *common, "--seed", "8")[0] == 0

    def content(name: str) -> list[tuple]:
        ds = load_from_disk(str(tmp_path / name))
        return [
            (split, r["source"], r["task"], r["instruction"], pixels(r["input_image"]).tobytes())
            for split in ds
            for r in ds[split]
        ]

    assert content("a") == content("b")
    assert content("a") != content("c")
    assert len(content("a")) == 2 * len(PHOTOS)


def test_build_dataset_is_the_library_behind_the_command_and_raises_itsd_errors(photos: Path, tmp_path: Path) -> None:
    from core.errors import InvalidParameters
    from training.prepare import DatasetSpec, build_dataset

    args = ["--clean", str(photos), "--task", "derain=2", "--task", "denoise", "--paraphrases", "all", "--seed", "3"]
    assert prepare(str(tmp_path / "command"), *args)[0] == 0
    spec = DatasetSpec(clean=photos, tasks={"derain": 2.0, "denoise": 1.0}, paraphrases="all", seed=3, resolution=64)
    reported: list[str] = []
    summary = build_dataset(spec, tmp_path / "library", progress=False, report=reported.append)
    assert summary == {**json.loads((tmp_path / "command" / "summary.json").read_text()), "output": summary["output"]}
    command, library = load_from_disk(str(tmp_path / "command")), load_from_disk(str(tmp_path / "library"))
    for split in command:
        assert [(r["instruction"], pixels(r["input_image"]).tobytes()) for r in command[split]] == [
            (r["instruction"], pixels(r["input_image"]).tobytes()) for r in library[split]
        ]
    assert reported == []

    wrong = {
        "give exactly one source": DatasetSpec(photos=photos, clean=photos),
        "--untouched goes with --clean": DatasetSpec(photos=photos, untouched=0.2),
        "no degradation or teacher for task(s) sharpen": DatasetSpec(clean=photos, tasks={"sharpen": 1.0}),
        "motion_blur has no parameter 'speed'": DatasetSpec(clean=photos, ranges={"motion_blur": {"speed": (0, 1)}}),
        "at most 1": DatasetSpec(clean=photos, validation_fraction=0.6, test_fraction=0.6),
        "no instruction templates for task 'derain'": DatasetSpec(clean=photos, templates_dir=tmp_path),
    }
    for says, bad in wrong.items():
        with pytest.raises(InvalidParameters, match=re.escape(says)):
            build_dataset(bad, tmp_path / "bad", progress=False)
    with pytest.raises(InvalidParameters, match="exists and is not empty"):
        build_dataset(spec, tmp_path / "library", progress=False)


def test_synthetic_targets_are_clean_crops_and_inputs_are_degraded(photos: Path, tmp_path: Path) -> None:
    code, output = prepare(
        str(tmp_path / "out"),
        "--clean",
        str(photos),
        "--validation-fraction",
        "0",
        "--test-fraction",
        "0",
        "--samples-per-image",
        "3",
    )
    assert code == 0, output
    table = rows(tmp_path / "out")
    assert len(table) == 3 * len(PHOTOS)
    assert {r["task"] for r in table} <= set(TASK_DEGRADATIONS)
    for r in table:
        clean, degraded = pixels(r["ground_truth_image"]), pixels(r["input_image"])
        assert clean.shape == degraded.shape == (64, 64, 3)
        assert psnr(clean, degraded) < 35
        assert r["instruction"] in load_templates(r["task"])


def test_a_synthetic_mixture_can_hold_cartoonization_made_by_the_built_in_teacher(photos: Path, tmp_path: Path) -> None:
    from training.teachers import cartoon

    common = ["--clean", str(photos), "--validation-fraction", "0", "--test-fraction", "0"]
    mixture = ["--task", "cartoonization", "--task", "denoise", "--samples-per-image", "3"]
    code, output = prepare(str(tmp_path / "out"), *common, *mixture)
    assert code == 0, output
    table = rows(tmp_path / "out")
    assert {r["task"] for r in table} == {"cartoonization", "denoise"}
    cartoons = [r for r in table if r["task"] == "cartoonization"]
    for r in cartoons:
        np.testing.assert_array_equal(pixels(r["ground_truth_image"]), cartoon(pixels(r["input_image"])))
        assert r["instruction"] in load_templates("cartoonization")
    code, output = prepare(str(tmp_path / "bad"), *common, "--task", "sharpen")
    assert code != 0 and "cartoonization" in output


def test_untouched_rows_leave_a_share_of_restoration_inputs_clean_so_only_the_instruction_tells_the_task(
    photos: Path, tmp_path: Path
) -> None:
    common = ["--clean", str(photos), "--validation-fraction", "0", "--test-fraction", "0", "--samples-per-image", "8"]
    mixture = ["--task", "cartoonization", "--task", "denoise", "--untouched", "0.5"]
    code, output = prepare(str(tmp_path / "out"), *common, *mixture)
    assert code == 0, output
    table = rows(tmp_path / "out")
    same = [np.array_equal(pixels(r["input_image"]), pixels(r["ground_truth_image"])) for r in table]
    denoise = [s for s, r in zip(same, table, strict=True) if r["task"] == "denoise"]
    assert 0 < sum(denoise) < len(denoise)  # some denoising rows have nothing to undo, the rest are noisy
    assert not any(s for s, r in zip(same, table, strict=True) if r["task"] == "cartoonization")  # the teacher edits
    code, output = prepare(str(tmp_path / "plain"), *common, "--task", "denoise")
    assert code == 0 and not any(
        np.array_equal(pixels(r["input_image"]), pixels(r["ground_truth_image"])) for r in rows(tmp_path / "plain")
    )
    code, output = prepare(str(tmp_path / "bad"), "--photos", str(photos), "--untouched", "0.2")
    assert code != 0 and "--untouched goes with --clean" in output


def test_a_degradation_range_sets_the_blur_and_a_wrong_one_is_refused_by_name(photos: Path, tmp_path: Path) -> None:
    common = ["--clean", str(photos), "--task", "deblur", "--test-fraction", "0", "--validation-fraction", "0"]
    # 64-px crops: the default blur is at its floor (5 px, radius 2 px); this one is twice that and more
    harsh = ["--degradation-range", "motion_blur.length=0.15,0.2", "--degradation-range=defocus_blur.radius=0.06,0.08"]
    assert prepare(str(tmp_path / "default"), *common, "--samples-per-image", "4")[0] == 0
    code, output = prepare(str(tmp_path / "harsh"), *common, *harsh, "--samples-per-image", "4")
    assert code == 0, output

    def input_psnr(name: str) -> float:
        return float(
            np.mean([psnr(pixels(r["ground_truth_image"]), pixels(r["input_image"])) for r in rows(tmp_path / name)])
        )

    assert input_psnr("harsh") < input_psnr("default") - 2.0
    summary = json.loads((tmp_path / "harsh" / "summary.json").read_text())
    assert summary["degradation_ranges"] == {
        "motion_blur": {"length": [0.15, 0.2]},
        "defocus_blur": {"radius": [0.06, 0.08]},
    }
    for wrong, says in (
        ("motion_blurr.length=0.01,0.02", "no degradation 'motion_blurr'; choose from rain, sensor_noise"),
        ("motion_blur.size=0.01,0.02", "motion_blur has no parameter 'size'; it has length, angle"),
        ("motion_blur.length=0.03,0.01", "runs backwards"),
        ("motion_blur.length=0.01", "write NAME.PARAMETER=LOW,HIGH"),
    ):
        code, output = prepare(str(tmp_path / "bad"), *common, "--degradation-range", wrong)
        assert code != 0 and says in output, (wrong, output)
    code, output = prepare(str(tmp_path / "bad"), "--photos", str(photos), *harsh)
    assert code != 0 and "--degradation-range goes with --clean" in output


def test_an_untouched_row_is_clean_or_has_another_tasks_damage_never_its_own(tmp_path: Path) -> None:
    from training.sources import SyntheticSource
    from training.teachers import BUILTIN_TEACHERS

    tasks = dict.fromkeys(("low_light", "denoise", "derain", "cartoonization"), 1.0)
    source = SyntheticSource(tmp_path, tasks, BUILTIN_TEACHERS, untouched=0.5)
    rng = np.random.default_rng(0)
    drawn = {task: {source.foreign_damage(task, rng) for _ in range(200)} for task in ("low_light", "denoise")}
    assert drawn["low_light"] == {None, "denoise", "derain"}  # never the teacher's task, never its own
    assert drawn["denoise"] == {None, "derain"}  # a dark photo carries sensor noise: denoising it has work to do


def test_paired_folders_stay_pixel_aligned_and_report_unmatched_files(photos: Path, tmp_path: Path) -> None:
    inputs, targets = tmp_path / "rainy", tmp_path / "clean"
    (inputs / "scene").mkdir(parents=True)
    (targets / "scene").mkdir(parents=True)
    for path in photos.iterdir():
        image = Image.open(path).convert("RGB")
        image.save(inputs / "scene" / f"{path.stem}.png")
        image.save(targets / "scene" / f"{path.stem}.png")
    Image.new("RGB", (80, 80)).save(inputs / "scene" / "orphan.png")
    code, output = prepare(
        str(tmp_path / "out"),
        "--pairs",
        str(inputs),
        str(targets),
        "--task",
        "derain",
        "--validation-fraction",
        "0",
        "--test-fraction",
        "0",
    )
    assert code == 0, output
    assert "unmatched: 1 inputs without a target" in output
    table = rows(tmp_path / "out")
    assert len(table) == len(PHOTOS)
    for r in table:
        assert np.array_equal(pixels(r["input_image"]), pixels(r["ground_truth_image"]))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["unmatched"]["inputs"] == ["scene/orphan"]


def test_pairs_match_after_stripping_name_affixes(tmp_path: Path) -> None:
    (tmp_path / "noisy").mkdir()
    (tmp_path / "gt").mkdir()
    for i in range(3):
        Image.new("RGB", (70, 70), (i * 40, 10, 10)).save(tmp_path / "noisy" / f"NOISY_SRGB_{i:03d}.png")
        Image.new("RGB", (70, 70), (i * 40, 10, 10)).save(tmp_path / "gt" / f"GT_SRGB_{i:03d}.png")
    code, output = prepare(
        str(tmp_path / "out"),
        "--pairs",
        str(tmp_path / "noisy"),
        str(tmp_path / "gt"),
        "--task",
        "denoise",
        "--pair-strip",
        "NOISY_",
        "--pair-strip",
        "GT_",
    )
    assert code == 0, output
    assert sum(json.loads((tmp_path / "out" / "summary.json").read_text())["rows"].values()) == 3


def test_splits_never_share_a_photo(photos: Path, tmp_path: Path) -> None:
    code, output = prepare(
        str(tmp_path / "out"),
        "--clean",
        str(photos),
        "--samples-per-image",
        "3",
        "--validation-fraction",
        "0.4",
        "--test-fraction",
        "0.3",
        "--seed",
        "3",
    )
    assert code == 0, output
    ds = load_from_disk(str(tmp_path / "out"))
    sources = {split: set(ds[split]["source"]) for split in ds}
    assert sum(len(s) for s in sources.values()) == len(set().union(*sources.values())) == len(PHOTOS)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows"] == {split: len(ds[split]) for split in ds}


def test_a_corrupt_image_is_skipped_and_counted_while_the_rest_go_through(photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photos.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, output = prepare(str(tmp_path / "out"), "--photos", str(folder), "--test-fraction", "0")
    assert code == 0, output
    assert "broken.jpg" in output and "skipped: 1" in output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == 1 and summary["skipped_files"][0]["unit"] == "broken"
    assert sum(summary["rows"].values()) == summary["tasks"]["cartoonization"] == len(PHOTOS)


def test_an_empty_folder_exits_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    code, output = prepare(str(tmp_path / "out"), "--clean", str(tmp_path / "empty"))
    assert code != 0
    assert output.strip().count("\n") == 0
    assert "no images found" in output


def test_the_cartoonization_schema_is_the_blogs_and_columns_are_configurable(photos: Path, tmp_path: Path) -> None:
    assert prepare(str(tmp_path / "blog"), "--photos", str(photos))[0] == 0
    ds = load_from_disk(str(tmp_path / "blog"))
    assert list(ds) == ["train", "validation", "test"]
    assert list(ds["train"].features) == ["original_image", "edit_prompt", "cartoonized_image", "task", "source"]
    assert type(ds["train"].features["original_image"]).__name__ == "Image"

    code, output = prepare(
        str(tmp_path / "mine"),
        "--photos",
        str(photos),
        "--original-image-column",
        "before",
        "--edit-prompt-column",
        "prompt",
        "--edited-image-column",
        "after",
        "--paraphrases",
        "all",
    )
    assert code == 0, output
    features = load_from_disk(str(tmp_path / "mine"))["train"].features
    assert list(features) == ["before", "prompt", "after", "task", "source", "instruction_choices"]


def test_the_low_level_schema_and_parquet_output_load_with_load_dataset(photos: Path, tmp_path: Path) -> None:
    code, output = prepare(
        str(tmp_path / "out"),
        "--clean",
        str(photos),
        "--task",
        "low_light",
        "--format",
        "parquet",
        "--paraphrases",
        "all",
        "--test-fraction",
        "0",
        "--validation-fraction",
        "0",
    )
    assert code == 0, output
    ds = load_dataset(str(tmp_path / "out"))
    row = ds["train"][0]
    assert list(ds["train"].features)[:3] == ["input_image", "instruction", "ground_truth_image"]
    assert row["task"] == "low_light" and row["instruction_choices"] == load_templates("low_light")


def test_a_command_teacher_makes_the_targets(photos: Path, tmp_path: Path) -> None:
    script = tmp_path / "invert.py"
    script.write_text(
        "import sys\nfrom PIL import Image, ImageOps\n"
        "ImageOps.invert(Image.open(sys.argv[1]).convert('RGB')).save(sys.argv[2])\n"
    )
    command = f'"{sys.executable}" "{script}" {{input}} {{output}}'
    code, output = prepare(
        str(tmp_path / "out"),
        "--photos",
        str(photos),
        "--teacher-command",
        command,
        "--task",
        "low_light",
        "--test-fraction",
        "0",
        "--validation-fraction",
        "0",
    )
    assert code == 0, output
    for r in rows(tmp_path / "out"):
        assert np.array_equal(255 - pixels(r["input_image"]), pixels(r["ground_truth_image"]))


def test_a_failing_command_teacher_skips_the_photo_with_its_reason(photos: Path, tmp_path: Path) -> None:
    command = f'"{sys.executable}" -c "import sys; sys.exit(3)" {{input}} {{output}}'
    code, output = prepare(str(tmp_path / "out"), "--photos", str(photos), "--teacher-command", command)
    assert code == 0, output
    assert f"skipped: {len(PHOTOS)}" in output and "exited 3" in output


def test_an_onnx_teacher_makes_the_targets(photos: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sub", ["one", "x"], ["y"])],
        "invert",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "invert.onnx")
    code, output = prepare(
        str(tmp_path / "out"),
        "--photos",
        str(photos),
        "--teacher-onnx",
        str(tmp_path / "invert.onnx"),
        "--test-fraction",
        "0",
        "--validation-fraction",
        "0",
    )
    assert code == 0, output
    for r in rows(tmp_path / "out"):
        assert np.abs(255 - pixels(r["original_image"]).astype(int) - pixels(r["cartoonized_image"])).max() <= 1
