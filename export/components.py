"""The four InstructPix2Pix graphs as torch modules, and their export to ONNX.

What each component is (names, axes, precision, example values) is declared once in `core.manifest.COMPONENTS`;
this module only knows how to wrap a diffusers module so its forward matches that declaration, and the sizes
of the declaration's symbols in a given pipeline.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from diffusers import AutoencoderKL

from core.manifest import ComponentSpec, image_dims

OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GB; above 1 GB, weights go to one .data file


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.model = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).last_hidden_state


class VaeEncoder(torch.nn.Module):
    """Image -> the latent distribution's mode (its mean), unscaled: what IP2P conditions on."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.mode()


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class Unet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


WRAPPERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "text_encoder": TextEncoder,
    "vae_encoder": VaeEncoder,
    "unet": Unet,
    "vae_decoder": VaeDecoder,
}
EXAMPLE = {"batch": 2, "side": 64}  # small, and no axis the exporter could mistake for a constant


def wrap(pipe, spec: ComponentSpec) -> torch.nn.Module:  # noqa: ANN001 (a diffusers pipeline)
    return WRAPPERS[spec.name](getattr(pipe, spec.module)).eval()


def model_dims(pipe) -> dict[str, int]:  # noqa: ANN001
    """The sizes of the model symbols in `COMPONENTS`' shapes, for this pipeline."""
    return {
        "unet_in_channels": pipe.unet.config.in_channels,
        "latent_channels": pipe.vae.config.latent_channels,
        "hidden": pipe.text_encoder.config.hidden_size,
        "sequence": pipe.tokenizer.model_max_length,
    }


def example_inputs(pipe, spec: ComponentSpec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """The tensors a component is traced with: its declared shapes at EXAMPLE's batch and side."""
    values = {**model_dims(pipe), **image_dims(EXAMPLE["side"], pipe.vae_scale_factor), "batch": EXAMPLE["batch"]}
    dtypes = {"int64": torch.int64, "float32": torch.float32, "float": dtype}
    return tuple(torch.full(t.resolve(values), t.example, dtype=dtypes[t.dtype]) for t in spec.inputs)


def export_component(
    module: torch.nn.Module,
    spec: ComponentSpec,
    args: tuple[torch.Tensor, ...],
    out: Path,
    external_threshold: int = EXTERNAL_DATA_BYTES,
) -> Path:
    """Trace `module` to `out/<name>.onnx`; weights above the threshold go to one `<name>.onnx.data` file.

    The TorchScript exporter spills a >2 GB model into hundreds of loose files, one per tensor, so it
    writes into a scratch folder and only the consolidated result is moved into `out`.
    """
    tensors = (*spec.inputs, *spec.outputs)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{spec.name}-") as scratch:
        traced = Path(scratch) / spec.filename
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(
                module,
                args,
                str(traced),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes={t.name: t.dynamic_axes for t in tensors if t.dynamic_axes},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(traced), load_external_data=True)
        path = out / spec.filename
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        if weight_bytes > external_threshold:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
    return path
