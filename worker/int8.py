"""int8 on OpenVINO CPU workers: the UNet's weights compressed to int8 by NNCF (`nncf.compress_weights`,
INT8_ASYM, per output channel), cached on disk.

The first load of a model in int8 on a machine compresses the UNet read from the artifact folder and saves
the result as OpenVINO IR under ITSD_CACHE_DIR/openvino, keyed by the model id and the compression settings
(`COMPRESSION`, NNCF's version included); later loads read that file and compress nothing. Weights-only
needs no calibration data. Only the UNet is compressed: it is nearly all of an edit's time and weights; the
VAE and text encoder stay fp32 (weights-only int8 made the tiny model's VAE decoder slower, 0.228 s against
0.146 s per call).

Why weights-only and not full quantization (`nncf.quantize`: int8 weights and activations, calibrated on the
UNet inputs of probe edits; `bench/int8.py` measures both): it measures better at the gate. On a 2-core AMD
EPYC with AVX2/FMA but no AVX-512 (no VNNI: no int8 dot products), shared with other work but measured at
quiet moments, one UNet call, batch 3, 256 px, and the gate's probe edit against fp32 (docs/benchmarks.md,
"int8 on OpenVINO", has the commands and a loaded run):

| model | fp32 | weights-only | full | PSNR weights-only | PSNR full |
|---|---|---|---|---|---|
| SD1.5-size (random weights), the calls taken in turn | 3.73 s | 3.91 s (0.95x) | 4.61 s (0.81x) | 54.0 dB | 29.9 dB |
| tiny | 0.0349 / 0.0372 s | 0.0366 s (0.95x) | 0.0455 s (0.82x) | 54.7 dB | 32.7 dB |

Full quantization drifts over 20 dB further from fp32 and is the slower of the two: without VNNI, OpenVINO's
int8 kernels do not beat its fp32 ones, and the quantize/dequantize pairs on activations cost extra.
Weights-only rounds only the weights and quarters their memory. Neither is faster than fp32 on this CPU, so
`--precision auto` keeps fp32 here (`worker.runtimes`); where int8 runs faster, the gate's timing lets auto
take it. The PSNR figures are over random weights: they measure mostly whether the arithmetic keeps parity,
not how a trained model's edits look; the gate measures each model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import nncf
import openvino as ov

log = logging.getLogger(__name__)
COMPRESSION = {"method": "nncf.compress_weights", "mode": "int8_asym", "nncf": nncf.__version__}


def settings_key() -> str:
    """A short hash of `COMPRESSION`: another setting or NNCF version makes another cached file."""
    return hashlib.sha256(json.dumps(COMPRESSION, sort_keys=True).encode()).hexdigest()[:12]


def compress_unet(unet: Path) -> ov.Model:
    """The UNet graph at `unet` with int8 weights (per output channel, asymmetric), computed in fp32."""
    return nncf.compress_weights(ov.Core().read_model(str(unet)), mode=nncf.CompressWeightsMode.INT8_ASYM)


def cached_int8_unet(unet: Path, model_id: str, cache: Path) -> Path:
    """The IR of the UNet at `unet` in int8 under `cache`: compressed and saved on first use, read after.
    The .xml is written last (the .bin first, each renamed into place), so a file found is complete."""
    xml = cache / f"{model_id}.unet.int8-{settings_key()}.xml"
    if xml.is_file():
        return xml
    log.info("%s: compressing the UNet's weights to int8 (once per model and machine)", unet.parent.name)
    model = compress_unet(unet)
    cache.mkdir(parents=True, exist_ok=True)
    partial = xml.with_name(f"{xml.stem}.{os.getpid()}.partial.xml")
    ov.save_model(model, str(partial), compress_to_fp16=False)
    partial.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    partial.replace(xml)
    return xml
