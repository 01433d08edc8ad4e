"""`itsd export`: verified artifacts, or one clear error and nothing that looks like an export."""

from __future__ import annotations

import functools
import json
import shutil
import stat

import onnx
import pytest
from click.testing import CliRunner

from core.errors import InvalidModel
from core.manifest import COMPONENTS, Manifest
from core.params import EDIT_DEFAULTS_FILE
from core.storage import usual_mode
from producer.cli import itsd


def run_export(*args):
    return CliRunner().invoke(itsd, ["export", *map(str, args)])


def test_export_writes_every_component_and_a_manifest_with_parity_over_40_db(tiny_artifacts, tiny_checkpoint):
    manifest = Manifest.read(tiny_artifacts)
    assert manifest.parity is not None and manifest.parity.psnr_db >= 40.0
    assert manifest.unet_in_channels == 8 and manifest.vae_scale_factor == 8
    assert manifest.source == str(tiny_checkpoint) and len(manifest.source_hash) == 64
    for name in COMPONENTS:
        onnx.checker.check_model(str(tiny_artifacts / f"{name}.onnx"))
    assert (tiny_artifacts / "tokenizer" / "tokenizer.json").is_file()
    assert (
        json.loads((tiny_artifacts / "scheduler_config.json").read_text())["_class_name"]
        == "EulerAncestralDiscreteScheduler"
    )
    for path in [tiny_artifacts, *tiny_artifacts.rglob("*")]:  # readable by a worker running as another user
        assert stat.S_IMODE(path.stat().st_mode) == usual_mode(directory=path.is_dir()), path
    unet_profile = manifest.tensorrt_profiles["unet"]["sample"]
    assert manifest.native_size == 256  # sample size 32 x VAE scale 8: the tile every large image is cut into
    assert unet_profile["opt"] == [3, 8, 32, 32] and unet_profile["min"][0] == 1
    assert manifest.parity.tiles > 1 and manifest.parity.tiled_psnr_db >= 40.0


@pytest.mark.slow
def test_fp16_export_makes_the_unet_fp16_and_still_verifies(tiny_checkpoint, tmp_path):
    result = run_export(tiny_checkpoint, tmp_path / "fp16", "--dtype", "fp16", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(tmp_path / "fp16")
    assert manifest.component_dtypes == {
        "text_encoder": "fp32",
        "vae_encoder": "fp32",
        "unet": "fp16",
        "vae_decoder": "fp32",
    }
    assert manifest.parity.psnr_db >= manifest.parity.threshold_db
    unet = onnx.load(str(tmp_path / "fp16" / "unet.onnx"))
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.slow
def test_large_weights_go_to_exactly_one_external_data_file_per_component(tiny_checkpoint, tmp_path, monkeypatch):
    from export import components, exporter

    # Every component counts as "large" here; the real threshold (1 GB) only the SD-size UNet crosses.
    monkeypatch.setattr(
        exporter, "export_component", functools.partial(components.export_component, external_threshold=0)
    )
    result = run_export(tiny_checkpoint, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output  # verified: ONNX Runtime loads the external data
    out = tmp_path / "out"
    for name in COMPONENTS:
        assert sorted(p.name for p in out.glob(f"{name}.onnx*")) == [f"{name}.onnx", f"{name}.onnx.data"]
        onnx.checker.check_model(str(out / f"{name}.onnx"))
        assert stat.S_IMODE((out / f"{name}.onnx.data").stat().st_mode) == usual_mode()


def test_a_plain_stable_diffusion_checkpoint_is_refused_with_the_reason(tmp_path):
    from training.tiny import build_tiny_checkpoint

    sd = build_tiny_checkpoint(tmp_path / "sd", unet_in_channels=4)
    result = run_export(sd, tmp_path / "out")
    assert result.exit_code == 1
    assert "4 input channels" in result.output and "itsd train" in result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_component_is_named(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shutil.rmtree(broken / "vae")
    result = run_export(broken, tmp_path / "out")
    assert result.exit_code == 1 and "vae" in result.output


def test_a_corrupt_weight_file_fails_cleanly_and_leaves_no_folder(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    result = run_export(broken, tmp_path / "out")
    assert result.exit_code == 1 and "cannot load checkpoint" in result.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    result = run_export(tmp_path / "photos", tmp_path / "out")
    assert result.exit_code == 1 and "not a diffusers checkpoint" in result.output


def test_an_unwritable_destination_is_one_clear_error(tiny_checkpoint, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")  # unwritable below, even for root
    result = run_export(tiny_checkpoint, tmp_path / "a-file" / "out")
    assert result.exit_code == 1 and "cannot write there" in result.output


def test_an_existing_export_is_kept_unless_overwrite(tiny_checkpoint, tiny_artifacts, tmp_path):
    out = tmp_path / "existing"
    shutil.copytree(tiny_artifacts, out)
    result = run_export(tiny_checkpoint, out, "--no-verify")
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = run_export(tiny_checkpoint, out, "--no-verify", "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert Manifest.read(out).parity is None and "not verified" in result.output


@pytest.mark.slow
def test_a_failed_parity_check_leaves_no_artifacts(tiny_checkpoint, tmp_path, monkeypatch):
    from export import verify

    monkeypatch.setitem(verify.THRESHOLD_DB, "fp32", 1000.0)
    result = run_export(tiny_checkpoint, tmp_path / "out")
    assert result.exit_code == 1 and "dB" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_loader_refuses_an_incomplete_folder(tiny_artifacts, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_artifacts, partial)
    (partial / "unet.onnx").unlink()
    with pytest.raises(InvalidModel, match=r"unet\.onnx"):
        Manifest.read(partial)


def test_a_hub_id_offline_is_one_clear_error_and_never_a_download(tmp_path):
    result = run_export("someorg/some-model", tmp_path / "out")
    assert result.exit_code == 1 and "Hub is unreachable or offline" in result.output
    assert not (tmp_path / "out").exists()


def test_a_checkpoints_edit_defaults_travel_in_the_manifest_and_its_identity(tiny_checkpoint, tiny_artifacts, tmp_path):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / EDIT_DEFAULTS_FILE).write_text('{"guidance_scale": 1.0, "image_guidance_scale": 1.0}')
    result = run_export(checkpoint, tmp_path / "onnx", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(tmp_path / "onnx")
    assert manifest.edit_defaults == {"guidance_scale": 1.0, "image_guidance_scale": 1.0}
    assert manifest.parity is not None and manifest.parity.psnr_db >= 40.0  # the probe still guides 3-way
    assert manifest.model_id != Manifest.read(tiny_artifacts).model_id  # other defaults, another model
    (checkpoint / EDIT_DEFAULTS_FILE).write_text('{"guidance": 1.0}')
    result = run_export(checkpoint, tmp_path / "bad", "--quiet")
    assert result.exit_code == 1 and "unknown edit default(s) guidance" in result.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # a fresh process importing torch and diffusers: 10-20 s
def test_the_export_command_prints_its_result_without_transformers_torchvision_notice(tiny_checkpoint, tmp_path):
    """itsd ships no torchvision on purpose; transformers' notice about it would send users to install it."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "producer.cli", "export", str(tiny_checkpoint), str(tmp_path / "a"), "--no-verify"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stdout and "torchvision" not in done.stderr + done.stdout
