"""`itsd export --lora`: random LoRAs, written offline for the tiny checkpoint, fused before export, verified
against diffusers with the same LoRA fused, and part of the model's identity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from core.errors import InvalidModel
from core.manifest import Lora, Manifest
from export import lora
from export.checkpoint import load_pipeline
from producer.cli import itsd
from training.tiny import write_random_lora


def run_export(*args):
    return CliRunner().invoke(itsd, ["export", *map(str, args)])


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_MATRICES = {"lora_A": "lora_down", "lora_B": "lora_up"}


def to_kohya(diffusers_file: Path, out: Path) -> Path:
    """The same LoRA in kohya's format: `lora_unet_<module_with_underscores>.lora_down/lora_up.weight`, `lora_te_`
    for the text encoder, and `.alpha` half the rank (the diffusers file has none: alpha = rank), so at scale 1 it
    is the diffusers file at scale 0.5."""
    tensors = {}
    for key, value in load_file(diffusers_file).items():
        module, _, kind = key.removesuffix(".weight").rpartition(".")
        component, _, path = module.partition(".")
        name = KOHYA_PREFIXES[component] + path.replace(".", "_")
        tensors[f"{name}.{KOHYA_MATRICES[kind]}.weight"] = value
        if kind == "lora_A":
            tensors[f"{name}.alpha"] = torch.tensor(value.shape[0] / 2)
    save_file(tensors, out)
    return out


@pytest.fixture(scope="module")
def lora_file(tiny_checkpoint, tmp_path_factory):
    """A random LoRA for the tiny checkpoint's UNet and text encoder, in the diffusers/PEFT format."""
    return write_random_lora(tiny_checkpoint, tmp_path_factory.mktemp("lora") / "random.safetensors", text_encoder=True)


@pytest.fixture(scope="module")
def base_weights(tiny_checkpoint):
    return fused_weights(tiny_checkpoint, [])


@pytest.fixture(scope="module")
def lora_weights(tiny_checkpoint, lora_file):
    return fused_weights(tiny_checkpoint, [(lora_file, 1.0)])


@pytest.fixture(scope="module")
def lora_artifacts(tiny_checkpoint, lora_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-onnx") / "tiny-lora"
    result = run_export(tiny_checkpoint, out, "--lora", f"{lora_file}=0.8")
    assert result.exit_code == 0, result.output
    assert f"LoRA {lora_file.name} x0.8" in result.output
    return out


def fused_weights(checkpoint, loras):
    pipe = load_pipeline(checkpoint)
    for path, scale in loras:
        lora.fuse(pipe, path, scale)
    return {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder")}


def changed(weights, base):
    return {c: sorted(k for k in base[c] if not torch.equal(weights[c][k], base[c][k])) for c in base}


def onnx_outputs(folder):
    """The UNet's and the text encoder's outputs for fixed inputs, straight from their ONNX graphs."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49408, (1, 77), dtype=np.int64)
    text = onnxruntime.InferenceSession(str(folder / "text_encoder.onnx")).run(None, {"input_ids": ids})[0]
    unet = onnxruntime.InferenceSession(str(folder / "unet.onnx")).run(
        None,
        {
            "sample": rng.standard_normal((1, 8, 16, 16), dtype=np.float32),
            "timestep": np.array([500.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32),
        },
    )[0]
    return text, unet


@pytest.mark.slow  # a second verified export of the tiny model: 20-40 s
def test_an_export_with_a_lora_has_it_in_both_graphs_and_matches_diffusers_with_it_fused(
    lora_artifacts, tiny_artifacts, lora_file
):
    manifest = Manifest.read(lora_artifacts)
    assert manifest.parity is not None and manifest.parity.psnr_db >= 40.0  # against diffusers, LoRA fused
    assert manifest.parity.tiled_psnr_db >= 40.0
    assert manifest.loras == (lora.describe(lora_file, 0.8),)
    plain = Manifest.read(tiny_artifacts)
    assert manifest.source_hash == plain.source_hash and manifest.model_id != plain.model_id
    for with_lora, without in zip(onnx_outputs(lora_artifacts), onnx_outputs(tiny_artifacts), strict=True):
        assert np.abs(with_lora - without).max() > 0.1 * np.abs(without).max()  # the text encoder's and the UNet's


def test_kohya_and_diffusers_formats_fuse_to_the_same_weights_in_the_unet_and_text_encoder(
    tiny_checkpoint, lora_file, base_weights, lora_weights, tmp_path
):
    kohya = to_kohya(lora_file, tmp_path / "kohya.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in load_file(kohya))
    assert all(changed(lora_weights, base_weights).values())  # UNet and text encoder both
    from_diffusers = fused_weights(tiny_checkpoint, [(lora_file, 0.5)])
    from_kohya = fused_weights(tiny_checkpoint, [(kohya, 1.0)])
    for component, tensors in from_diffusers.items():
        assert sorted(tensors) == sorted(from_kohya[component])  # plain modules again: nothing left of PEFT
        for key, tensor in tensors.items():
            torch.testing.assert_close(from_kohya[component][key], tensor, rtol=0, atol=1e-6)
    assert all(changed(from_diffusers, lora_weights).values())  # the scale (and kohya's alpha) took effect


def test_a_lora_at_scale_zero_is_the_checkpoint_and_loras_fuse_in_order(
    tiny_checkpoint, lora_file, base_weights, lora_weights, tmp_path
):
    assert not any(changed(fused_weights(tiny_checkpoint, [(lora_file, 0.0)]), base_weights).values())
    unet_only = write_random_lora(tiny_checkpoint, tmp_path / "unet-only.safetensors", seed=1)
    both = fused_weights(tiny_checkpoint, [(lora_file, 1.0), (unet_only, 1.0)])
    assert changed(both, lora_weights)["unet"] and not changed(both, lora_weights)["text_encoder"]


def test_the_loras_and_their_scales_are_the_models_identity_and_old_manifests_still_read(tiny_artifacts):
    plain = Manifest.read(tiny_artifacts)
    assert plain.loras == () and plain.model_id == f"{plain.source_hash[:16]}-fp32"  # as before LoRAs
    data = json.loads(plain.to_json())
    del data["loras"]  # a manifest written before LoRAs were recorded
    assert Manifest.from_dict(data) == plain
    one = Lora("lcm.safetensors", "a" * 64, 1.0)
    with_one = dataclasses.replace(plain, loras=(one,))
    assert Manifest.from_dict(json.loads(with_one.to_json())) == with_one
    assert with_one.model_id != plain.model_id
    assert with_one.lora_summary == "LoRA lcm.safetensors x1" and plain.lora_summary == ""
    assert dataclasses.replace(plain, loras=(Lora("renamed.safetensors", "a" * 64, 1.0),)).model_id == with_one.model_id
    other_ids = {
        dataclasses.replace(plain, loras=loras).model_id
        for loras in [
            (dataclasses.replace(one, scale=0.5),),
            (dataclasses.replace(one, sha256="b" * 64),),
            (one, one),
            (one, dataclasses.replace(one, sha256="b" * 64)),
            (dataclasses.replace(one, sha256="b" * 64), one),
        ]
    }
    assert len(other_ids) == 5 and with_one.model_id not in other_ids


@pytest.mark.parametrize(
    ("name", "tensors", "message"),
    [
        (
            "conv-in-of-sd.safetensors",  # a 4-channel SD UNet's first conv; IP2P's takes 8
            {
                "unet.conv_in.lora_A.weight": torch.ones(4, 4, 3, 3),
                "unet.conv_in.lora_B.weight": torch.ones(32, 4, 1, 1),
            },
            "size mismatch for conv_in",
        ),
        (
            "other-model.safetensors",
            {
                "unet.nowhere.proj.lora_A.weight": torch.ones(4, 32),
                "unet.nowhere.proj.lora_B.weight": torch.ones(32, 4),
            },
            "not found in the base model",
        ),
        (
            "half-fits.safetensors",
            {
                "unet.nowhere.proj.lora_A.weight": torch.ones(4, 32),
                "unet.nowhere.proj.lora_B.weight": torch.ones(32, 4),
                "unet.conv_in.lora_A.weight": torch.ones(4, 8, 3, 3),
                "unet.conv_in.lora_B.weight": torch.ones(32, 4, 1, 1),
            },
            "1 of its 2 layer",
        ),
        ("no-lora.safetensors", {"model.weight": torch.ones(3)}, "0 of its 0 layer"),
    ],
)
def test_a_lora_that_does_not_fit_the_model_is_refused_by_name(tiny_checkpoint, tmp_path, name, tensors, message):
    save_file(tensors, tmp_path / name)
    result = run_export(tiny_checkpoint, tmp_path / "out", "--lora", tmp_path / name, "--no-verify")
    assert result.exit_code == 1 and name in result.output and message in result.output, result.output
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / name]


def test_a_refused_lora_leaves_no_adapter_behind_and_the_next_one_fuses(tiny_checkpoint, lora_file, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = load_pipeline(tiny_checkpoint)
    half = {"unet.conv_in.lora_A.weight": torch.ones(4, 8, 3, 3), "unet.conv_in.lora_B.weight": torch.ones(32, 4, 1, 1)}
    save_file({**half, "unet.nowhere.lora_A.weight": torch.ones(4, 8)}, tmp_path / "bad.safetensors")
    with pytest.raises(InvalidModel, match=r"bad\.safetensors: 1 of its 2 layer"):
        lora.fuse(pipe, tmp_path / "bad.safetensors", 1.0)
    assert not any(isinstance(m, BaseTunerLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    assert lora.fuse(pipe, lora_file, 1.0).file == lora_file.name


@pytest.mark.parametrize(
    ("option", "code", "message"),
    [
        ("missing.safetensors", 1, "no such file"),
        ("weights.bin", 1, "not a .safetensors file"),
        ("weights.safetensors=strong", 2, "'strong' is not a number"),
        ("weights.safetensors=nan", 2, "finite"),
        ("weights.safetensors=inf", 2, "finite"),
    ],
)
def test_a_bad_lora_option_is_one_clear_error_before_any_loading(tiny_checkpoint, tmp_path, option, code, message):
    for name in ("weights.bin", "weights.safetensors"):
        (tmp_path / name).write_bytes(b"{}")
    result = run_export(tiny_checkpoint, tmp_path / "out", "--lora", tmp_path / option)
    assert result.exit_code == code and message in result.output, result.output
    assert not (tmp_path / "out").exists()
