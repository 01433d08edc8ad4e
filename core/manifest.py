"""The artifact folder's contract: what export writes and the only thing a worker reads.

Model facts are data. `COMPONENTS` holds one record per ONNX component: its inputs and outputs with their
symbolic axes, the precision it keeps and its TensorRT batch range. Export derives `dynamic_axes`, example
inputs, dtypes and TensorRT profiles from it; the worker checks sessions against it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InvalidModel, SchemaError
from core.params import check_edit_defaults

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
TOKENIZER_DIR = "tokenizer"
SCHEDULER_FILE = "scheduler_config.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64", "float32", or "float" for the component's floating dtype (fp32 or fp16)
    shape: tuple[int | str, ...]  # str entries are symbols: model dimensions, or dynamic axes
    example: float = 0.0  # the value export traces with

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def resolve(self, values: Mapping[str, int]) -> list[int | str]:
        """The shape with every symbol that `values` knows replaced by its size."""
        return [values.get(d, d) if isinstance(d, str) else d for d in self.shape]


@dataclass(frozen=True)
class ComponentSpec:
    """Everything one ONNX graph is: its tensors, the precision it keeps, and the batches TensorRT builds for."""

    name: str
    module: str  # the diffusers pipeline's attribute it is exported from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    always_fp32: bool = False  # kept fp32 in an fp16 export
    trt_batch: tuple[int, int, int] = (1, 1, 1)  # TensorRT profile's batch: min, opt, max

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def trt_profile(self, dims: Mapping[str, int], vae_scale: int, side: Mapping[str, int]) -> dict[str, Any]:
        """{input: {min|opt|max: shape}}: the shape ranges a TensorRT engine is built for, pixel sides `side`."""
        values = {
            bound: {**dims, **image_dims(side[bound], vae_scale), "batch": batch}
            for bound, batch in zip(("min", "opt", "max"), self.trt_batch, strict=True)
        }
        return {t.name: {bound: t.resolve(v) for bound, v in values.items()} for t in self.inputs}


def image_dims(side: int, vae_scale: int) -> dict[str, int]:
    """The image and latent symbols' sizes for a square image of `side` pixels."""
    return {"height": side, "width": side, "latent_height": side // vae_scale, "latent_width": side // vae_scale}


def _t(name: str, *shape: int | str, dtype: str = "float", example: float = 0.0) -> TensorSpec:
    return TensorSpec(name, dtype, shape, example)


# InstructPix2Pix in four ONNX graphs. The VAE encoder returns the latent distribution's mode
# (unscaled, as IP2P conditions on it); the decoder takes latents already divided by the scale factor.
# fp16 is for the UNet, where the time goes: the SD VAE overflows to NaN in fp16, and the text encoder runs
# once per instruction per process (cached) and, traced in fp16, mixes dtypes in its LayerNorms.
# TensorRT batches: 3-way guidance makes 3 UNet rows per tile, up to 4 tiles a call (--tile-batch).
COMPONENTS: dict[str, ComponentSpec] = {
    c.name: c
    for c in (
        ComponentSpec(
            "text_encoder",
            "text_encoder",
            (_t("input_ids", "batch", "sequence", dtype="int64"),),
            (_t("last_hidden_state", "batch", "sequence", "hidden"),),
            always_fp32=True,
            trt_batch=(1, 2, 2),
        ),
        ComponentSpec(
            "vae_encoder",
            "vae",
            (_t("sample", "batch", 3, "height", "width"),),
            (_t("latent", "batch", "latent_channels", "latent_height", "latent_width"),),
            always_fp32=True,
        ),
        ComponentSpec(
            "unet",
            "unet",
            (
                _t("sample", "batch", "unet_in_channels", "latent_height", "latent_width"),
                _t("timestep", "batch", dtype="float32", example=500.0),
                _t("encoder_hidden_states", "batch", "sequence", "hidden"),
            ),
            (_t("out_sample", "batch", "latent_channels", "latent_height", "latent_width"),),
            trt_batch=(1, 3, 12),
        ),
        ComponentSpec(
            "vae_decoder",
            "vae",
            (_t("latent", "batch", "latent_channels", "latent_height", "latent_width"),),
            (_t("sample", "batch", 3, "height", "width"),),
            always_fp32=True,
        ),
    )
}
TRT_SIDE = {"min": 64, "opt": 512, "max": 1024}  # pixel sides TensorRT engines are built for; opt: the native tile


@dataclass(frozen=True)
class Parity:
    """How the ONNX pipeline compared with the diffusers pipeline on the probe, at export time."""

    psnr_db: float
    max_abs_diff: float  # on the decoded image, in [0, 255] units
    steps: int
    scheduler: str
    size: tuple[int, int]
    threshold_db: float
    # The same tiled loop over torch's modules and over the ONNX sessions, on a probe of several tiles.
    tiled_psnr_db: float | None = None
    tiles: int | None = None


@dataclass(frozen=True)
class Lora:
    """A LoRA fused into the exported weights (`itsd export --lora`)."""

    file: str  # its file name, as given
    sha256: str  # of its bytes: with the scale, part of the model's identity (the name is not)
    scale: float


@dataclass(frozen=True)
class Manifest:
    source: str  # checkpoint path or Hub id as given
    source_hash: str  # sha256 over the checkpoint's files: with the LoRAs, the model's identity
    dtype: str  # "fp32" or "fp16" (the UNet and text encoder; see component_dtypes)
    component_dtypes: dict[str, str]
    opset: int
    onnxruntime_version: str
    torch_version: str
    latent_channels: int
    unet_in_channels: int
    vae_scale_factor: int  # pixels per latent
    latent_scaling_factor: float  # the VAE's scaling_factor (0.18215 for SD 1.x)
    text_hidden_size: int
    max_text_length: int
    pad_token_id: int
    scheduler_class: str
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {file, inputs, outputs}
    tensorrt_profiles: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)
    parity: Parity | None = None
    edit_defaults: dict[str, Any] = field(default_factory=dict)  # the checkpoint's edit_defaults.json
    native_size: int | None = None  # px the UNet was made for (sample size x VAE scale); None: exported before tiling
    loras: tuple[Lora, ...] = ()  # fused into the UNet and text encoder at export, in this order
    schema_version: int = MANIFEST_VERSION

    @property
    def tile_size(self) -> int:
        """The side of the tiles images are edited in: the native size, else SD's (64 latents)."""
        return self.native_size or 64 * self.vae_scale_factor

    @property
    def model_id(self) -> str:
        """Identity of the served model: the checkpoint's content, the LoRAs fused into it (content, scale and
        order) and the export's dtype. Without LoRAs it is what it was before LoRAs were recorded."""
        identity = self.source_hash
        if self.loras:
            fused = json.dumps([self.source_hash, *((lora.sha256, lora.scale) for lora in self.loras)])
            identity = hashlib.sha256(fused.encode()).hexdigest()
        return f"{identity[:16]}-{self.dtype}"

    @property
    def lora_summary(self) -> str:
        """The fused LoRAs in one phrase ("LoRA a.safetensors x1, LoRA b.safetensors x0.5"); "" when none."""
        return ", ".join(f"LoRA {lora.file} x{lora.scale:g}" for lora in self.loras)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != MANIFEST_VERSION:
            raise SchemaError(f"manifest schema version {version!r}; this itsd reads version {MANIFEST_VERSION}")
        parity = data.get("parity")
        defaults = check_edit_defaults(data.get("edit_defaults", {}), "manifest edit_defaults")
        try:
            return cls(
                **{
                    **data,
                    "parity": None if parity is None else Parity(**{**parity, "size": tuple(parity["size"])}),
                    "edit_defaults": defaults,
                    "loras": tuple(Lora(**lora) for lora in data.get("loras", ())),
                }
            )
        except TypeError as exc:
            raise SchemaError(f"manifest does not match schema version {MANIFEST_VERSION}: {exc}") from None

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise InvalidModel(f"{folder}: no such artifact folder")
        if not path.is_file():
            raise InvalidModel(
                f"{folder}: not an itsd artifact folder (no {MANIFEST_NAME}); make one with `itsd export`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidModel(f"{path}: unreadable manifest: {exc}") from None
        manifest = cls.from_dict(data)
        missing = [c["file"] for c in manifest.components.values() if not (folder / c["file"]).is_file()]
        if missing or set(manifest.components) != set(COMPONENTS):
            raise InvalidModel(f"{folder}: incomplete artifact folder (missing {', '.join(missing) or 'components'})")
        return manifest


def checkpoint_hash(folder: Path) -> str:
    """sha256 over every config and weight file (relative path and bytes): the model's identity."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".safetensors")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
