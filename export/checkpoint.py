"""Finding, checking and loading a diffusers InstructPix2Pix checkpoint (a folder, or a Hub id)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.errors import InvalidModel

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
IP2P_CHANNELS = 8  # noisy latents (4) + image latents (4)


def resolve(source: str) -> Path:
    """A local folder as is; otherwise a Hub id, downloaded (safetensors only) unless HF_HUB_OFFLINE."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        if not path.is_dir():
            raise InvalidModel(f"{source}: no such checkpoint folder")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                source,
                allow_patterns=["*.json", "*.txt", "*.safetensors"],
                ignore_patterns=["*.fp16.safetensors", "*non_ema*", "safety_checker/*"],
            )
        )
    except LocalEntryNotFoundError:
        raise InvalidModel(f"{source}: not a local folder, and the Hub is unreachable or offline") from None
    except HfHubHTTPError as exc:
        raise InvalidModel(f"{source}: cannot download from the Hub: {exc}") from None


def check(folder: Path) -> dict:
    """Validate the folder's layout and UNet channels without loading weights; return model_index."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InvalidModel(f"{folder}: not a diffusers checkpoint (no model_index.json)")
    try:
        index = json.loads(index_path.read_text())
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
    except FileNotFoundError as exc:
        raise InvalidModel(f"{folder}: missing component: {Path(exc.filename).parent.name}") from None
    except json.JSONDecodeError as exc:
        raise InvalidModel(f"{folder}: corrupt config: {exc}") from None
    missing = [c for c in REQUIRED if c not in index or not (folder / c).is_dir()]
    if missing:
        raise InvalidModel(f"{folder}: missing component(s): {', '.join(missing)}")
    channels = unet_config.get("in_channels")
    if channels != IP2P_CHANNELS:
        raise InvalidModel(
            f"{folder}: UNet has {channels} input channels, InstructPix2Pix needs {IP2P_CHANNELS}; this looks "
            f"like a text-to-image Stable Diffusion checkpoint: fine-tune it with `itsd train` first"
        )
    return index


def load_pipeline(folder: Path):  # noqa: ANN201 (diffusers type; imported lazily)
    """Load the checkpoint as a diffusers pipeline in fp32 on the CPU, safetensors only."""
    for library in ("DIFFUSERS", "TRANSFORMERS"):
        os.environ.setdefault(f"{library}_VERBOSITY", "error")
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils.logging import disable_progress_bar
    from transformers.utils.logging import disable_progress_bar as disable_transformers_progress_bar

    disable_progress_bar()
    disable_transformers_progress_bar()

    check(folder)
    try:
        return StableDiffusionInstructPix2PixPipeline.from_pretrained(
            folder, use_safetensors=True, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InvalidModel(f"{folder}: cannot load checkpoint: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """A library error in one line (diffusers' run to pages), or its type when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
