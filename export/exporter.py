"""`itsd export`: checkpoint in, artifact folder out, all or nothing.

Everything is written into a hidden sibling folder; only a complete, verified export is renamed into
place, so a crash, a failed parity check or a bad checkpoint never leaves a folder that looks valid.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from core.errors import ExportFailed, ParityError
from core.manifest import COMPONENTS, TOKENIZER_DIR, TRT_SIDE, Lora, Manifest, TensorSpec, checkpoint_hash
from core.params import read_edit_defaults
from core.storage import usual_mode
from export import checkpoint, lora, verify
from export.components import OPSET, example_inputs, export_component, model_dims, wrap
from export.reference import TorchEditPipeline, native_size

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def export_checkpoint(
    source: str,
    out: Path,
    dtype: str = "fp32",
    verify_parity: bool = True,
    overwrite: bool = False,
    report: Callable[[str], None] = log.info,
    loras: Sequence[tuple[Path | str, float]] = (),
) -> Manifest:
    """Export `source` to `out`, with `loras` (file, scale) fused into its weights in order; the parity check
    compares with the same fused pipeline."""
    folder = checkpoint.resolve(source)
    checkpoint.check(folder)
    for path, _ in loras:
        lora.check_file(Path(path))
    edit_defaults = read_edit_defaults(folder)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportFailed(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    staging = _staging_folder(out)
    try:
        report(f"loading {source}")
        pipe = checkpoint.load_pipeline(folder)
        fused = []
        for path, scale in loras:
            report(f"fusing LoRA {path} at scale {scale:g}")
            fused.append(lora.fuse(pipe, Path(path), scale))
        report("hashing checkpoint")
        manifest = _manifest(pipe, source, checkpoint_hash(folder), dtype, edit_defaults, fused)
        for name, spec in COMPONENTS.items():
            report(f"exporting {name} ({manifest.component_dtypes[name]})")
            torch_dtype = DTYPES[manifest.component_dtypes[name]]
            module = wrap(pipe, spec)
            if torch_dtype != torch.float32:
                module = copy.deepcopy(module).to(torch_dtype)  # the fp32 original stays for the parity check
            export_component(module, spec, example_inputs(pipe, spec, torch_dtype), staging)
        pipe.tokenizer.save_pretrained(staging / TOKENIZER_DIR)
        if not (staging / TOKENIZER_DIR / "tokenizer.json").is_file():
            pipe.tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_DIR / "tokenizer.json"))
        pipe.scheduler.save_config(staging)
        manifest.write(staging)
        if verify_parity:
            report("verifying against the diffusers pipeline")
            manifest = _verify(TorchEditPipeline(pipe, edit_defaults), staging, manifest)
            manifest.write(staging)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _staging_folder(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise ExportFailed(f"{out}: cannot write there: {exc.strerror or exc}") from None


def _publish(staging: Path, out: Path) -> None:
    """Swap the finished folder into place; an old export is removed only after the swap."""
    for path in [staging, *staging.rglob("*")]:  # mkdtemp and onnx's external-data writer make them private
        path.chmod(usual_mode(directory=path.is_dir()))
    retired = None
    if out.exists():
        retired = out.with_name(f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out.rename(retired)
    staging.rename(out)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _verify(reference: TorchEditPipeline, staging: Path, manifest: Manifest) -> Manifest:
    from worker.pipeline import OnnxEditPipeline  # the serving code, exactly as a worker runs it

    candidate = OnnxEditPipeline(staging, provider_names=("CPUExecutionProvider",))
    parity = verify.measure(reference, candidate, manifest.dtype)
    if parity.psnr_db < parity.threshold_db:
        raise ParityError(
            f"ONNX export differs from the diffusers pipeline: {parity.psnr_db:.1f} dB PSNR (max diff "
            f"{parity.max_abs_diff:.0f}/255), under the {parity.threshold_db:.0f} dB required for {manifest.dtype}"
        )
    if parity.tiled_psnr_db is not None and parity.tiled_psnr_db < parity.threshold_db:
        raise ParityError(
            f"ONNX export differs from PyTorch on a {parity.tiles}-tile probe: {parity.tiled_psnr_db:.1f} dB PSNR, "
            f"under the {parity.threshold_db:.0f} dB required for {manifest.dtype}"
        )
    return replace(manifest, parity=parity)


def _manifest(
    pipe,  # noqa: ANN001
    source: str,
    source_hash: str,
    dtype: str,
    edit_defaults: dict[str, float],
    loras: list[Lora],
) -> Manifest:
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    dims = model_dims(pipe)
    side = {**TRT_SIDE, "opt": min(max(native_size(pipe), TRT_SIDE["min"]), TRT_SIDE["max"])}
    components = {
        name: {
            "file": spec.filename,
            "inputs": [_tensor(t, dims) for t in spec.inputs],
            "outputs": [_tensor(t, dims) for t in spec.outputs],
        }
        for name, spec in COMPONENTS.items()
    }
    return Manifest(
        source=source,
        source_hash=source_hash,
        dtype=dtype,
        component_dtypes={name: "fp32" if spec.always_fp32 else dtype for name, spec in COMPONENTS.items()},
        opset=OPSET,
        onnxruntime_version=onnxruntime.__version__,
        torch_version=torch.__version__,
        latent_channels=vae.latent_channels,
        unet_in_channels=unet.in_channels,
        vae_scale_factor=pipe.vae_scale_factor,
        latent_scaling_factor=float(vae.scaling_factor),
        text_hidden_size=text.hidden_size,
        max_text_length=dims["sequence"],
        pad_token_id=int(pipe.tokenizer.pad_token_id),
        scheduler_class=type(pipe.scheduler).__name__,
        components=components,
        tensorrt_profiles={
            name: spec.trt_profile(dims, pipe.vae_scale_factor, side) for name, spec in COMPONENTS.items()
        },
        edit_defaults=edit_defaults,
        native_size=native_size(pipe),
        loras=tuple(loras),
    )


def _tensor(spec: TensorSpec, dims: dict[str, int]) -> dict[str, Any]:
    return {"name": spec.name, "dtype": spec.dtype, "shape": spec.resolve(dims)}
