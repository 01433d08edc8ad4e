"""int8 on OpenVINO, two ways, on an exported model: weights-only (`nncf.compress_weights`, INT8_ASYM: int8
weights, fp32 arithmetic; what `worker.int8` runs) against full quantization (`nncf.quantize`: int8 weights
and activations, calibrated on the UNet inputs of two 4-step probe edits of export's synthetic probe photo,
in fp32). For each, what the precision gate measures (`worker.runtimes.measure`): the probe edit's PSNR
against fp32 and one UNet call at the probe's shape (batch 3: the guidance copies; the fastest of 3, the
fp32 and int8 calls taken in turn), and how long quantizing took. `--side` sets the probe's side (default:
the model's tile). Prints one JSON line.

    python bench/int8.py ARTIFACTS [--side 256] [--cache DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nncf
import numpy as np
import openvino as ov
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
from PIL import Image

from bench.pipeline import machine
from core.edit import ModelFacts, Tiling, edit_image
from core.manifest import COMPONENTS
from core.params import EditParams
from export.verify import probe_image
from worker.openvino_runtime import OpenVinoEditPipeline
from worker.runtimes import measure

CALIBRATION = (("turn the sky into a sunset", 0), ("Cartoonize the image", 1))  # 2 edits x 4 steps: 8 UNet calls


class Recording(OpenVinoEditPipeline):
    """fp32, keeping every UNet call's inputs."""

    inputs: list[dict[str, np.ndarray]]

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        self.inputs.append({"sample": sample, "timestep": timestep, "encoder_hidden_states": text})
        return super().predict_noise(sample, timestep, text)


def fully_quantized(folder: Path, cache: Path, facts: ModelFacts) -> OpenVinoEditPipeline:
    """`folder` with its UNet quantized by `nncf.quantize` (saved as IR under `cache`), calibrated on probe edits
    of `facts.tile_size` px."""
    recording = Recording(folder, "fp32", cache)
    recording.facts, recording.inputs = facts, []
    side = facts.tile_size
    photo = Image.fromarray(np.round((probe_image(side, side)[0].transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))
    for instruction, seed in CALIBRATION:
        edit_image(recording, photo, instruction, EditParams(steps=4, seed=seed), Tiling())
    model = nncf.quantize(
        ov.Core().read_model(str(folder / COMPONENTS["unet"].filename)),
        nncf.Dataset(recording.inputs),
        subset_size=len(recording.inputs),
        model_type=nncf.ModelType.TRANSFORMER,  # softmax and normalizations stay fp32
        advanced_parameters=AdvancedQuantizationParameters(
            disable_bias_correction=True, smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)
        ),
    )
    path = cache / "unet.int8-full.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)
    backend = OpenVinoEditPipeline(folder, "fp32", cache)
    backend.sources["unet"] = path
    return backend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--side", type=int, default=None, help="the probe edit's side in px (default: the tile's)")
    parser.add_argument("--cache", type=Path, default=None, help="ITSD_CACHE_DIR for this run (default: a new one)")
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="itsd-bench-int8-"))
    fp32 = OpenVinoEditPipeline(args.artifacts, "fp32", cache)
    facts = dataclasses.replace(fp32.facts, tile_size=args.side or fp32.facts.tile_size)
    fp32.facts = facts
    figures = {}
    for name, load in [
        ("weights_only", lambda: OpenVinoEditPipeline(args.artifacts, "int8", cache)),
        ("full", lambda: fully_quantized(args.artifacts, cache, facts)),
    ]:
        start = time.perf_counter()
        backend = load()
        backend.facts = facts
        figures[name] = {"quantize_s": round(time.perf_counter() - start, 1), **measure(fp32, backend, "int8")}
        del backend
        gc.collect()
    print(
        json.dumps(
            {
                "bench": "int8",
                "machine": machine(),
                "model_id": fp32.manifest.model_id,
                "side": facts.tile_size,
                "int8": figures,
                "nncf": nncf.__version__,
                "openvino": ov.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
