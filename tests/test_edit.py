"""`itsd edit`: the ONNX pipeline matches diffusers for a seed, and a bad image never stops a batch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from core.edit import edit_image
from core.images import psnr
from core.manifest import MANIFEST_NAME
from core.params import EDIT_DEFAULTS_FILE, EditParams
from producer.cli import itsd
from tests.conftest import photo
from tests.photos import caption, check_collection, photo_collection
from worker.pipeline import OnnxEditPipeline


def run_edit(*args):
    return CliRunner().invoke(itsd, ["edit", *map(str, args)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "trip").mkdir()
    photo(96, 80, seed=1).save(folder / "a.png")
    photo(130, 70, seed=2).save(folder / "trip" / "b.jpg", quality=95)
    return folder


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpm-multistep", "lcm"])
@pytest.mark.parametrize("guidance", [("7.0", "1.5"), ("1.0", "1.0")])
def test_onnx_and_torch_backends_give_the_same_image_for_a_seed(
    tiny_checkpoint, tiny_artifacts, photos, tmp_path, scheduler, guidance
):
    common = [
        "--instruction",
        "Cartoonize the image",
        "--seed",
        "7",
        "--steps",
        "5",
        "--scheduler",
        scheduler,
        "--guidance-scale",
        guidance[0],
        "--image-guidance-scale",
        guidance[1],
        "--quiet",
    ]
    onnx = run_edit(photos, "--model", tiny_artifacts, "--out", tmp_path / "onnx", *common)
    torch = run_edit(photos, "--model", tiny_checkpoint, "--out", tmp_path / "torch", "--backend", "torch", *common)
    assert onnx.exit_code == 0 and torch.exit_code == 0, onnx.output + torch.output
    for name in ["a.png", "trip/b.jpg"]:
        ours, theirs = (np.asarray(Image.open(tmp_path / side / name)) for side in ("onnx", "torch"))
        assert psnr(ours, theirs) >= 40.0, name


def test_outputs_keep_the_inputs_names_folders_and_sizes(tiny_artifacts, photos, tmp_path):
    result = run_edit(photos, "--model", tiny_artifacts, "--out", tmp_path, "-i", "Derain", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "edited 2/2" in result.output
    assert Image.open(tmp_path / "a.png").size == (96, 80)
    with Image.open(tmp_path / "trip" / "b.jpg") as out:
        assert (out.size, out.format) == ((130, 70), "JPEG")


def test_itsd_edit_gives_an_output_its_inputs_alpha_and_colour_profile(tiny_artifacts, tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((90, 70)))
    (tmp_path / "in").mkdir()
    rgba.save(tmp_path / "in" / "logo.png", icc_profile=icc)
    rgba.convert("RGB").save(tmp_path / "in" / "photo.jpg", icc_profile=icc)
    result = run_edit(tmp_path / "in", "--model", tiny_artifacts, "--out", tmp_path / "out", "-i", "Derain", "-q")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "logo.png") as logo, Image.open(tmp_path / "out" / "photo.jpg") as photo:
        assert logo.mode == "RGBA" and logo.info["icc_profile"] == icc == photo.info["icc_profile"]
        assert np.array_equal(np.asarray(logo.getchannel("A")), np.asarray(rgba.getchannel("A")))


def test_itsd_edit_gives_each_photo_back_its_capture_date_camera_and_location_and_grey_scans_stay_grey(
    tiny_artifacts, tmp_path
):
    inputs = photo_collection(tmp_path / "in", photo(72, 56))
    common = ["--model", tiny_artifacts, "-i", "Derain", "--steps", "1", "-q"]
    result = run_edit(inputs, "--out", tmp_path / "out", *common)
    assert result.exit_code == 0, result.output
    check_collection(tmp_path / "out", (72, 56))
    published = run_edit(inputs, "--out", tmp_path / "published", "--strip-gps", *common)
    assert published.exit_code == 0, published.output
    check_collection(tmp_path / "published", (72, 56), gps=False)
    bare = run_edit(inputs / "a.jpg", "--out", tmp_path / "bare", "--strip-metadata", *common)
    assert bare.exit_code == 0, bare.output
    with Image.open(tmp_path / "bare" / "a.jpg") as image:
        assert not image.getexif() and "xmp" not in image.info and caption(image) is None


def test_a_corrupt_image_is_reported_and_the_rest_go_on(tiny_artifacts, photos, tmp_path):
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    photo(64, 64).save(tmp_path / "in" / "good.png")
    result = run_edit(
        tmp_path / "in", "--model", tiny_artifacts, "--out", tmp_path / "out", "-i", "Denoise", "--steps", "1"
    )
    assert result.exit_code == 1
    assert "broken.png" in result.output and "cannot decode" in result.output and "1 failed" in result.output
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "broken.png").exists()


def test_an_empty_instruction_is_refused(tiny_artifacts, photos, tmp_path):
    result = run_edit(photos, "--model", tiny_artifacts, "--out", tmp_path, "-i", "  ")
    assert result.exit_code == 2 and "instruction is empty" in result.output


def test_a_checkpoint_given_to_the_onnx_backend_says_how_to_export_it(tiny_checkpoint, photos, tmp_path):
    result = run_edit(photos, "--model", tiny_checkpoint, "--out", tmp_path, "-i", "x")
    assert result.exit_code == 1 and "itsd export" in result.output


def test_the_same_seed_gives_the_same_image_and_another_seed_does_not(tiny_artifacts):
    pipeline = OnnxEditPipeline(tiny_artifacts)
    image = photo(64, 64)
    first, again, other = (
        edit_image(pipeline, image, "Cartoonize", EditParams(steps=3, seed=s)).image for s in (1, 1, 2)
    )
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_guidance_runs_three_unet_rows_and_no_guidance_runs_one(tiny_artifacts, monkeypatch):
    pipeline = OnnxEditPipeline(tiny_artifacts)
    batches = []
    original = pipeline._run

    def spy(name, **inputs):
        if name == "unet":
            batches.append(inputs["sample"].shape[0])
        return original(name, **inputs)

    monkeypatch.setattr(pipeline, "_run", spy)
    edit_image(pipeline, photo(64, 64), "x", EditParams(steps=2, seed=0))
    edit_image(pipeline, photo(64, 64), "x", EditParams(steps=2, seed=0, guidance_scale=1.0))
    assert batches == [3, 3, 1, 1]


def test_the_instruction_is_encoded_once_per_process(tiny_artifacts, monkeypatch):
    pipeline = OnnxEditPipeline(tiny_artifacts)
    calls = []
    original = pipeline.tokenizer

    monkeypatch.setattr(pipeline, "tokenizer", lambda texts: calls.append(texts) or original(texts))
    for seed in range(3):
        edit_image(pipeline, photo(64, 64), "Cartoonize the image", EditParams(steps=1, seed=seed))
    assert calls == [["Cartoonize the image"], [""]]


def test_an_output_that_cannot_be_written_fails_alone(tiny_artifacts, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    photo(64, 64).save(tmp_path / "in" / "sub" / "a.png")
    photo(64, 64).save(tmp_path / "in" / "b.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file where the output folder should be")
    result = run_edit(tmp_path / "in", "--model", tiny_artifacts, "--out", tmp_path / "out", "-i", "x", "--steps", "1")
    assert result.exit_code == 1 and "cannot write output" in result.output and "1 failed" in result.output
    assert (tmp_path / "out" / "b.png").is_file()


def test_a_runtime_failure_in_onnx_runtime_is_a_transient_provider_error(tiny_artifacts):
    from core.errors import ProviderError

    pipeline = OnnxEditPipeline(tiny_artifacts)
    with pytest.raises(ProviderError, match="unet"):
        pipeline._run("unet", sample=np.zeros((1, 3, 8, 8), np.float32))  # wrong inputs


def test_an_output_folder_that_would_overwrite_the_inputs_is_refused(tiny_artifacts, tmp_path):
    photo(64, 64).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    result = run_edit(tmp_path, "--model", tiny_artifacts, "--out", tmp_path, "-i", "x", "--steps", "1")
    assert result.exit_code == 1 and "would overwrite the input" in result.output
    assert (tmp_path / "a.png").read_bytes() == before


def test_a_folder_with_no_images_is_one_clear_error(tiny_artifacts, tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    result = run_edit(tmp_path, "--model", tiny_artifacts, "--out", tmp_path / "out", "-i", "x")
    assert result.exit_code == 1 and "no images found" in result.output


def test_skip_existing_resumes_without_recomputing_finished_images(tiny_artifacts, photos, tmp_path):
    first = run_edit(photos / "a.png", "--model", tiny_artifacts, "--out", tmp_path, "-i", "x", "--steps", "1")
    assert first.exit_code == 0, first.output
    stamp = (tmp_path / "a.png").stat().st_mtime_ns
    again = run_edit(photos, "--model", tiny_artifacts, "--out", tmp_path, "-i", "x", "--steps", "1", "--skip-existing")
    assert again.exit_code == 0 and "edited 1/1" in again.output and "1 already done" in again.output
    assert (tmp_path / "a.png").stat().st_mtime_ns == stamp and (tmp_path / "trip" / "b.jpg").is_file()


def test_unset_steps_and_guidance_are_the_models_own_on_each_backend(tiny_checkpoint, tiny_artifacts, photos, tmp_path):
    defaults = {"steps": 3, "guidance_scale": 1.0, "image_guidance_scale": 1.0}
    artifacts = shutil.copytree(tiny_artifacts, tmp_path / "onnx-model")
    manifest = json.loads((artifacts / MANIFEST_NAME).read_text())
    (artifacts / MANIFEST_NAME).write_text(json.dumps({**manifest, "edit_defaults": defaults}))
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "torch-model")
    (checkpoint / EDIT_DEFAULTS_FILE).write_text(json.dumps(defaults))
    explicit = ["--steps", "3", "--guidance-scale", "1", "--image-guidance-scale", "1"]
    runs = {
        "model": (artifacts, []),
        "explicit": (tiny_artifacts, explicit),
        "project": (tiny_artifacts, []),
        "torch": (checkpoint, ["--backend", "torch"]),
    }
    for name, (model, extra) in runs.items():
        common = ["-i", "Derain", "--seed", "7", "--scheduler", "euler"]  # deterministic: backends agree
        result = run_edit(photos / "a.png", "-m", model, "-o", tmp_path / name, *common, *extra)
        assert result.exit_code == 0, result.output
    images = {name: np.asarray(Image.open(tmp_path / name / "a.png")) for name in runs}
    assert np.array_equal(images["model"], images["explicit"])
    assert psnr(images["torch"], images["model"]) >= 40.0
    assert not np.array_equal(images["model"], images["project"])  # 20 steps at 7.0 / 1.5


def test_a_large_image_is_edited_at_its_own_size_in_tiles_with_a_progress_bar(tiny_artifacts, tmp_path):
    (tmp_path / "in").mkdir()
    photo(700, 300, seed=5).save(tmp_path / "in" / "wide.png")  # 8 tiles of 256 px: beyond the old 512-px cap
    result = run_edit(
        tmp_path / "in", "--model", tiny_artifacts, "-i", "x", "--out", tmp_path / "out",
        "--steps", "2", "--seed", "0", "--tile-batch", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "wide.png").size == (700, 300)
    assert "wide.png" in result.output and "/28 " in result.output  # 8 encodes, 2 steps x 4 batches, 8 decodes,
    # and the global view's 1 + 2 + 1
