"""LoRAs fused into the checkpoint's weights before export: `itsd export --lora FILE[=SCALE]`.

A LoRA file is safetensors in the diffusers/PEFT format or kohya's (`lora_unet_*`, `lora_te_*`), read by
diffusers' own `lora_state_dict`; its UNet part goes in through diffusers and its text-encoder part through
PEFT (the way diffusers does it, minus transformers' `load_adapter`, which wants a PEFT release newer than
any published). Each is fused at its scale and unloaded, in order, so the pipeline that is exported, and
verified against, is plain diffusers modules with the LoRAs in their weights. A file that does not fit
(keys that match no module, or shapes of another model) is refused rather than fused as a no-op.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import InvalidModel
from core.manifest import Lora
from export.checkpoint import first_line

SUFFIX = ".safetensors"
TEXT_ENCODER_PREFIX = "text_encoder."
ADAPTER = "itsd_export"  # one LoRA is loaded at a time: fused, then unloaded


def check_file(path: Path) -> None:
    """A LoRA file must exist and be safetensors (never a pickle)."""
    if not path.is_file():
        raise InvalidModel(f"LoRA {path}: no such file")
    if path.suffix != SUFFIX:
        raise InvalidModel(f"LoRA {path}: not a {SUFFIX} file (pickled weights are never loaded)")


def describe(path: Path, scale: float) -> Lora:
    """The manifest's record of a LoRA: its file name, content hash and scale."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return Lora(file=path.name, sha256=digest.hexdigest(), scale=float(scale))


def fuse(pipe, path: Path, scale: float) -> Lora:  # noqa: ANN001 (diffusers IP2P pipeline)
    """Fuse the LoRA at `path` into `pipe`'s UNet (and text encoder, if it has weights for it) at `scale`, and
    unload it: the modules stay plain, with the LoRA in their weights. Returns its manifest record."""
    check_file(path)
    components = _load(pipe, path)
    pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=[ADAPTER])
    pipe.unload_lora_weights()
    return describe(path, scale)


def _load(pipe, path: Path) -> list[str]:  # noqa: ANN001
    """Inject `path`'s LoRA into the pipeline as adapter ADAPTER; return the components it reached."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise InvalidModel(f"LoRA {path}: not a readable safetensors file: {first_line(exc)}") from None
    try:
        state_dict, alphas = pipe.lora_state_dict(tensors)
        unet_part = {k: v for k, v in state_dict.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
        text_part = {k: v for k, v in state_dict.items() if k.startswith(TEXT_ENCODER_PREFIX)}
        if unet_part:
            pipe.load_lora_into_unet(unet_part, alphas, unet=pipe.unet, adapter_name=ADAPTER)
        if text_part:
            _load_into_text_encoder(pipe.text_encoder, text_part, alphas)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        pipe.unload_lora_weights()
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
        raise InvalidModel(f"LoRA {path}: does not fit this model: {mismatch or first_line(exc)}") from None
    wanted = sum(1 for key in state_dict if key.endswith(("lora_A.weight", "down.weight")))
    reached = {c: _adapted_modules(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    if wanted == 0 or sum(reached.values()) != wanted:
        pipe.unload_lora_weights()
        raise InvalidModel(
            f"LoRA {path}: {sum(reached.values())} of its {wanted} layer(s) match this model's modules; "
            "it was made for another model"
        )
    return [c for c, count in reached.items() if count]


def _load_into_text_encoder(text_encoder, state_dict: dict, alphas: dict | None) -> None:  # noqa: ANN001
    """diffusers' steps for a text-encoder LoRA (diffusers-format keys, PEFT config from ranks and alphas),
    injected with PEFT."""
    state_dict = {k.removeprefix(TEXT_ENCODER_PREFIX): v for k, v in state_dict.items()}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel; LoRAs keep the prefix
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    ranks = {k: v.shape[1] for k, v in state_dict.items() if k.endswith("lora_B.weight")}
    alphas = {k.removeprefix(TEXT_ENCODER_PREFIX): v for k, v in (alphas or {}).items() if k.startswith("text_encoder")}
    config = LoraConfig(**get_peft_kwargs(ranks, alphas or None, state_dict, is_unet=False))
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(text_encoder, state_dict, adapter_name=ADAPTER)
    if result.unexpected_keys:
        raise KeyError(f"unexpected key(s) {', '.join(result.unexpected_keys[:3])}")


def _adapted_modules(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and ADAPTER in getattr(m, "lora_A", {}))
