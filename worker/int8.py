"""int8 on OpenVINO CPU workers: the UNet quantized by NNCF's post-training quantization (`nncf.quantize`,
weights and activations), calibrated on the UNet inputs of probe edits in fp32, and cached on disk.

The first load of a model in int8 on a machine runs the calibration edits (synthetic probe photos from
`core.probes`: nothing is downloaded), quantizes the UNet read from the artifact folder and saves the result
as OpenVINO IR under ITSD_CACHE_DIR/openvino, keyed by the model id and the quantization settings
(`QUANTIZATION`, NNCF's version included); later loads read that file and quantize nothing. Only the UNet is
quantized: it is nearly all of an edit's time; the VAE and text encoder stay in fp32.

Why full quantization and not weights-only (`nncf.compress_weights`, INT8_ASYM): measured on a 2-core AMD
EPYC with AVX2 but no AVX-512 and no VNNI (shared with other work, so a few percent is noise), one UNet call
at the gate probe's shape and the probe edit's PSNR against fp32:
WEIGHTS_VS_FULL
Weights-only keeps fp32 arithmetic and adds a dequantization of every weight to every call: on this CPU it
is slower than fp32, and it only pays where memory bandwidth, not arithmetic, bounds a call. Full
quantization runs int8 convolutions and matmuls. The PSNR figures are over random weights, so they measure
mostly whether the arithmetic keeps parity, not how a trained model's edits look; the gate
(`worker.runtimes.gated`) measures each real model before int8 serves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import nncf
import numpy as np
import openvino as ov
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

from core.edit import Backend, Tiling, edit_image
from core.manifest import COMPONENTS
from core.params import EditParams
from core.probes import probe_photo

log = logging.getLogger(__name__)
# Two calibration edits of 4 steps: 8 UNet calls (each with its guidance copies), every step's timestep.
# Few, because quantization runs each of them again while a worker starts, on however few cores it has.
CALIBRATION = (("turn the sky into a sunset", 0), ("Cartoonize the image", 1))
CALIBRATION_STEPS = 4
QUANTIZATION = {
    "method": "nncf.quantize",
    "model_type": "transformer",  # NNCF's scheme for attention models: softmax and normalizations stay fp32
    "smooth_quant_matmul_alpha": -1,  # SmoothQuant off and bias correction off: the settings measured below
    "bias_correction": False,
    "calibration": [list(edit) for edit in CALIBRATION],
    "calibration_steps": CALIBRATION_STEPS,
    "nncf": nncf.__version__,
}


class _Recording:
    """A backend that keeps every UNet call's inputs, for calibration."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.facts = backend.facts
        self.edit_defaults = backend.edit_defaults
        self.inputs: list[dict[str, np.ndarray]] = []

    def encode_text(self, text: str) -> np.ndarray:
        return self.backend.encode_text(text)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.backend.encode_image(pixels)

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        self.inputs.append({"sample": sample, "timestep": timestep, "encoder_hidden_states": text})
        return self.backend.predict_noise(sample, timestep, text)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.backend.decode(latents)


def calibration_inputs(fp32: Backend) -> list[dict[str, np.ndarray]]:
    """The UNet inputs of the calibration edits of one native tile of a probe photo, in fp32."""
    recording = _Recording(fp32)
    side = fp32.facts.tile_size
    for instruction, seed in CALIBRATION:
        params = EditParams(steps=CALIBRATION_STEPS, seed=seed)
        edit_image(recording, probe_photo(side, side), instruction, params, Tiling())
    return recording.inputs


def settings_key() -> str:
    """A short hash of `QUANTIZATION`: another setting or NNCF version makes another cached file."""
    return hashlib.sha256(json.dumps(QUANTIZATION, sort_keys=True).encode()).hexdigest()[:12]


def quantize_unet(unet: Path, fp32: Backend) -> ov.Model:
    """The UNet graph at `unet` with int8 weights and activations, calibrated on `fp32`'s probe edits."""
    inputs = calibration_inputs(fp32)
    parameters = AdvancedQuantizationParameters(
        disable_bias_correction=not QUANTIZATION["bias_correction"],
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=QUANTIZATION["smooth_quant_matmul_alpha"]),
    )
    return nncf.quantize(
        ov.Core().read_model(str(unet)),
        nncf.Dataset(inputs),
        subset_size=len(inputs),
        model_type=nncf.ModelType.TRANSFORMER,
        advanced_parameters=parameters,
    )


def cached_int8_unet(folder: Path, model_id: str, cache: Path) -> Path:
    """The IR of `folder`'s UNet in int8 under `cache`: quantized and saved on first use, read after.
    The .xml is written last (the .bin first, each renamed into place), so a file found is complete."""
    xml = cache / f"{model_id}.unet.int8-{settings_key()}.xml"
    if xml.is_file():
        return xml
    from worker.openvino_runtime import OpenVinoEditPipeline

    log.info("%s: quantizing the UNet to int8 (once per model and machine)", folder.name)
    model = quantize_unet(folder / COMPONENTS["unet"].filename, OpenVinoEditPipeline(folder, "fp32", cache.parent))
    cache.mkdir(parents=True, exist_ok=True)
    partial = xml.with_name(f"{xml.stem}.{os.getpid()}.partial.xml")
    ov.save_model(model, str(partial), compress_to_fp16=False)
    partial.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    partial.replace(xml)
    return xml
