"""Fewer UNet evaluations for the same edit: guidance copies whose weight is zero are not computed, and
`guidance_until` ends guidance early, held to diffusers' pipeline with the equivalent step-end callback."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from core import edit
from core.access import Access
from core.edit import IMAGE_ONLY, NEITHER, TEXT_IMAGE, Tiling, generate, guidance_copies, plan, sample
from core.images import psnr, to_model_input
from core.params import EditParams
from export.reference import TorchEditPipeline, diffusers_generate
from producer.cli import itsd
from producer.sources import collect_sources
from tests.conftest import photo
from worker.openvino_runtime import OpenVinoEditPipeline
from worker.pipeline import OnnxEditPipeline

RUNTIMES = {"onnxruntime": OnnxEditPipeline, "openvino": OpenVinoEditPipeline}


def unet_batches(backend, monkeypatch) -> list[int]:
    """The batch of every UNet call `backend` makes from now on."""
    batches: list[int] = []
    original = backend.predict_noise

    def spy(sample, timestep, text):
        batches.append(len(sample))
        return original(sample, timestep, text)

    monkeypatch.setattr(backend, "predict_noise", spy)
    return batches


@pytest.mark.parametrize(
    ("scales", "copies"),
    [
        ((7.0, 1.5), (TEXT_IMAGE, IMAGE_ONLY, NEITHER)),
        ((7.0, 1.0), (TEXT_IMAGE, IMAGE_ONLY)),  # image guidance 1: no `neither` copy
        ((2.0, 2.0), (TEXT_IMAGE, NEITHER)),  # equal scales: no `image only` copy
        ((1.0, 1.5), (TEXT_IMAGE,)),  # unguided, as diffusers: text guidance not over 1
        ((7.0, 0.5), (TEXT_IMAGE,)),  # image guidance under 1
    ],
)
def test_a_step_holds_only_the_copies_whose_weight_is_not_zero(scales, copies):
    assert guidance_copies(EditParams(guidance_scale=scales[0], image_guidance_scale=scales[1]).resolve({})) == copies


@pytest.mark.parametrize(
    ("until", "steps", "guided"), [(1.0, 20, 20), (0.4, 20, 8), (0.3, 4, 2), (0.0, 20, 0), (0.05, 3, 1)]
)
def test_guidance_until_is_a_fraction_of_the_steps_rounded_up(until, steps, guided):
    assert EditParams(steps=steps, guidance_until=until).resolve({}).guided_steps == guided
    assert EditParams(steps=steps, guidance_scale=1.0, guidance_until=until).resolve({}).guided_steps == 0


@pytest.fixture(scope="module")
def torch_backend(tiny_checkpoint):
    return TorchEditPipeline.load(tiny_checkpoint)


@pytest.mark.parametrize("runtime", [*RUNTIMES, "torch"])
@pytest.mark.parametrize("scales", [(7.0, 1.0), (3.0, 3.0)])
def test_copy_elision_gives_the_three_copy_result(tiny_artifacts, torch_backend, runtime, scales, monkeypatch):
    backend = torch_backend if runtime == "torch" else RUNTIMES[runtime](tiny_artifacts)
    pixels = to_model_input(np.asarray(photo(128, 96)))
    params = EditParams(steps=4, seed=3, guidance_scale=scales[0], image_guidance_scale=scales[1]).resolve({})
    layout = plan(backend.facts, 96, 128, Tiling(size=64))  # several tiles, so tile batches are covered too
    batches = unet_batches(backend, monkeypatch)
    elided = sample(backend, pixels, layout, 2, "Cartoonize", params, 3)
    assert set(batches) == {2 * 2}  # 2 tiles a call, 2 copies each
    monkeypatch.setattr(edit, "guidance_copies", lambda _: (TEXT_IMAGE, IMAGE_ONLY, NEITHER))
    batches.clear()
    every = sample(backend, pixels, layout, 2, "Cartoonize", params, 3)
    assert set(batches) == {2 * 3}
    # torch's CPU UNet is not batch-invariant: the same row gives another last bit in another batch (about 1.5e-6
    # of its prediction, measured), which the steps carry on; ONNX Runtime and OpenVINO are
    np.testing.assert_allclose(elided, every, rtol=0, atol=2e-5 if runtime == "torch" else 1e-6)


def test_guidance_until_runs_one_copy_after_the_cutoff(tiny_artifacts, monkeypatch):
    backend = OnnxEditPipeline(tiny_artifacts)
    batches = unet_batches(backend, monkeypatch)
    image = photo(64, 64)
    edit.edit_image(backend, image, "x", EditParams(steps=5, seed=0, guidance_until=0.4))
    assert batches == [3, 3, 1, 1, 1]
    batches.clear()
    edit.edit_image(backend, image, "x", EditParams(steps=5, seed=0, guidance_until=0.4, image_guidance_scale=1.0))
    assert batches == [2, 2, 1, 1, 1]


@pytest.mark.parametrize("until", [0.0, 0.4])
def test_guidance_until_matches_diffusers_with_a_cutoff_callback(torch_backend, tiny_artifacts, until):
    pixels = to_model_input(np.asarray(photo(128, 128, seed=4)))  # one tile: diffusers' pipeline is untiled
    params = EditParams(steps=5, seed=9, scheduler="euler", guidance_until=until).resolve({})
    expected = diffusers_generate(torch_backend, pixels, "Cartoonize the image", params, 9)
    full = diffusers_generate(torch_backend, pixels, "Cartoonize the image", replace(params, guidance_until=1.0), 9)
    for backend in (torch_backend, OnnxEditPipeline(tiny_artifacts)):
        got = generate(backend, pixels, "Cartoonize the image", params, 9, plan(backend.facts, 128, 128))
        assert psnr(expected, got) >= 40.0, type(backend).__name__
        assert psnr(expected, got) > psnr(full, got) + 20.0  # the cutoff changed the image: parity is not vacuous


def test_guidance_until_is_an_edit_option_and_a_manifest_column(tiny_artifacts, tmp_path):
    photo(64, 64).save(tmp_path / "a.png")
    common = ["edit", str(tmp_path / "a.png"), "--model", str(tiny_artifacts), "--instruction", "x", "--steps", "2"]
    refused = CliRunner().invoke(itsd, [*common, "--out", str(tmp_path / "out"), "--guidance-until", "1.5"])
    assert refused.exit_code == 2 and "--guidance-until" in refused.output
    done = CliRunner().invoke(itsd, [*common, "--out", str(tmp_path / "out"), "--guidance-until", "0.5", "-q"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out" / "a.png").is_file()
    (tmp_path / "jobs.jsonl").write_text(
        '{"input": "a.png", "guidance_until": 0.25}\n{"input": "a.png", "output": "b.png", "guidance_until": 2}\n'
    )
    sources, rejected = collect_sources([str(tmp_path / "jobs.jsonl")], "x", EditParams(guidance_until=0.5), Access())
    assert [s.params.guidance_until for s in sources] == [0.25]
    assert len(rejected) == 1 and "guidance_until must be 0..1" in str(rejected[0].error)
