"""Which runtime and precision run an artifact folder, and the numbers that allow bf16 and int8.

- Runtime: `onnxruntime` (TensorRT, CUDA or CPU execution providers) or `openvino` (CPUs). `auto` picks
  OpenVINO on an x86 CPU that has it installed (`pip install 'itsd[openvino]'`) when ONNX Runtime has no GPU
  provider to use, else ONNX Runtime.
- Precision: `fp32`, `bf16` or `int8` (OpenVINO only; int8: the UNet's weights compressed by NNCF,
  `worker.int8`).
- bf16 and int8 are gated by numbers, by one gate (`gated`): the first time a model is loaded in either on a
  machine, one probe edit runs in fp32 and in it, and one UNet call of each is timed; the precision is refused
  below ITSD_BF16_MIN_PSNR or ITSD_INT8_MIN_PSNR dB (35 each), with one line that says so (a warning when asked
  for by name, an info line under `auto`): the model runs in
  what `auto` would otherwise pick. The measurement is kept under ITSD_CACHE_DIR/openvino, by model id.
- `auto`, on OpenVINO: bf16 where the CPU computes it natively (AVX512-BF16 or AMX), else int8 where NNCF
  is installed, else fp32; bf16 or int8 only past its gate and only if its UNet call measured at least
  AUTO_MIN_SPEEDUP times as fast as fp32's on the probe, else fp32. Auto never tries int8 where it tries bf16:
  int8 against native bf16 has not been measured. On ONNX Runtime, fp32.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.edit import Backend, Tiling, edit_image
from core.errors import InvalidParameters
from core.images import psnr
from core.params import EditParams
from core.settings import PRECISIONS, RUNTIMES, Settings
from core.storage import write_atomic

log = logging.getLogger(__name__)
GATE_PROBE = EditParams(steps=4, seed=0)  # a short edit: the drift shows in every step's prediction
GATE_INSTRUCTION = "Make it brighter"
MIN_PSNR_SETTINGS = {"bf16": "bf16_min_psnr", "int8": "int8_min_psnr"}  # Settings' field for ITSD_<P>_MIN_PSNR
AUTO_MIN_SPEEDUP = 1.1  # auto's bar over fp32's UNet call: a margin over a shared machine's timing noise


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def nncf_installed() -> bool:
    return importlib.util.find_spec("nncf") is not None


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (OpenVINO lists BF16 among the CPU plugin's capabilities)."""
    if not openvino_installed():
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _gpu_provider_usable(providers: tuple[str, ...]) -> bool:
    import onnxruntime as ort

    from worker.providers import GPU_PROVIDERS

    available = set(ort.get_available_providers())
    return any(p in GPU_PROVIDERS and p in available for p in providers)


def choose_runtime(requested: str, providers: tuple[str, ...]) -> str:
    if requested not in RUNTIMES:
        raise InvalidParameters(f"runtime {requested!r}: use {', '.join(RUNTIMES)}")
    if requested == "openvino" and not openvino_installed():
        raise InvalidParameters("the openvino runtime is not installed: pip install 'itsd[openvino]'")
    if requested != "auto":
        return requested
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and openvino_installed() and not _gpu_provider_usable(providers):
        return "openvino"
    return "onnxruntime"


def choose_precision(requested: str, runtime: str) -> str:
    """The precision to load (bf16 and int8 still have their gate to pass): `auto` decided, or what was asked
    if this runtime runs it."""
    if requested not in PRECISIONS:
        raise InvalidParameters(f"precision {requested!r}: use {', '.join(PRECISIONS)}")
    if requested in MIN_PSNR_SETTINGS and runtime != "openvino":
        raise InvalidParameters(f"{requested} runs on the openvino runtime: add --runtime openvino")
    if requested == "int8" and not nncf_installed():
        raise InvalidParameters("int8 needs NNCF to compress the UNet: pip install 'itsd[openvino]'")
    if requested != "auto":
        return requested
    if runtime != "openvino":
        return "fp32"
    if native_bf16():
        return "bf16"
    return "int8" if nncf_installed() else "fp32"


def check_choice(runtime: str, precision: str, providers: tuple[str, ...]) -> None:
    """Refuse, before anything loads, a runtime that is not installed or bf16 or int8 on ONNX Runtime. `auto`
    precision is left to the pool processes: asking OpenVINO about the CPU here would start its threads
    in the process Celery forks."""
    chosen = choose_runtime(runtime, providers)
    if precision != "auto":
        choose_precision(precision, chosen)


def probe_psnr(fp32: Backend, other: Backend) -> float:
    """PSNR of a probe edit (one native tile of a smooth gradient) by `other` against `fp32`."""
    side = fp32.facts.tile_size
    y, x = np.mgrid[0:side, 0:side] / side
    image = Image.fromarray((np.stack([x, y, 1 - x * y], axis=-1) * 255).astype(np.uint8))
    edits = [np.asarray(edit_image(b, image, GATE_INSTRUCTION, GATE_PROBE, Tiling()).image) for b in (fp32, other)]
    return psnr(*edits)


def unet_seconds(backends: dict[str, Backend], calls: int = 3) -> dict[str, float]:
    """Each backend's fastest of `calls` UNet calls at the probe edit's shape (one tile, 3 guidance copies, as
    compiled by the probe edit), the backends called in turn so that other work on the machine weighs on each
    alike."""
    facts = next(iter(backends.values())).facts
    latent = facts.tile_size // facts.vae_scale_factor
    sample = np.zeros((3, 2 * facts.latent_channels, latent, latent), np.float32)
    timestep = np.full(3, 500.0, np.float32)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(calls):
        for name, backend in backends.items():
            text = np.concatenate([backend.encode_text(GATE_INSTRUCTION)] * 3)
            start = time.perf_counter()
            backend.predict_noise(sample, timestep, text)
            times[name].append(time.perf_counter() - start)
    return {name: round(min(seconds), 4) for name, seconds in times.items()}


def measure(fp32: Backend, other: Backend, precision: str) -> dict[str, Any]:
    """The gate's record: the probe edit's PSNR against fp32 and one UNet call's seconds in each precision."""
    return {
        "psnr_db": round(probe_psnr(fp32, other), 2),
        "unet_s": unet_seconds({"fp32": fp32, precision: other}),
        "probe": GATE_PROBE.to_dict(),
    }


def gated(folder: Path, precision: str, settings: Settings, auto: bool = False) -> Backend:
    """The model in `precision` (bf16 or int8) if its probe edit stays within that precision's bar against fp32
    (ITSD_BF16_MIN_PSNR, ITSD_INT8_MIN_PSNR) and, under `auto`, its UNet call is AUTO_MIN_SPEEDUP times as fast
    as fp32's; else in fp32, or for an int8 asked by name, in what `auto` would otherwise pick (bf16 where
    native, through this gate)."""
    from worker.openvino_runtime import OpenVinoEditPipeline

    candidate = OpenVinoEditPipeline(folder, precision, settings.cache_dir)
    record = settings.cache_dir / "openvino" / f"{candidate.manifest.model_id}.{precision}.json"
    kept = json.loads(record.read_text()) if record.is_file() else {}
    fp32: Backend | None = None
    if "unet_s" in kept:  # a record from before the gate timed the UNet is measured again
        measured = kept
    else:
        fp32 = OpenVinoEditPipeline(folder, "fp32", settings.cache_dir)
        measured = measure(fp32, candidate, precision)
        write_atomic(record, json.dumps(measured).encode())
    bar = getattr(settings, MIN_PSNR_SETTINGS[precision])
    speedup = measured["unet_s"]["fp32"] / measured["unet_s"][precision]
    if measured["psnr_db"] >= bar and (not auto or speedup >= AUTO_MIN_SPEEDUP):
        return candidate
    del candidate
    fallback = "bf16" if precision == "int8" and not auto and native_bf16() else "fp32"
    if measured["psnr_db"] < bar:  # a warning where it was asked for by name; under auto, the choice working
        log.log(
            logging.INFO if auto else logging.WARNING,
            "%s: %s is %.1f dB from fp32 on the probe edit, under ITSD_%s_MIN_PSNR (%g): running %s",
            folder.name,
            precision,
            measured["psnr_db"],
            precision.upper(),
            bar,
            fallback,
        )
    else:
        log.info(
            "%s: %s's UNet call is %.2fx fp32's on this CPU, under %g: running fp32",
            folder.name,
            precision,
            speedup,
            AUTO_MIN_SPEEDUP,
        )
    if fallback == "bf16":
        return gated(folder, "bf16", settings, auto=True)
    return fp32 or OpenVinoEditPipeline(folder, "fp32", settings.cache_dir)


def load_artifacts(
    folder: Path,
    runtime: str = "auto",
    precision: str = "auto",
    providers: tuple[str, ...] | None = None,
    device_id: int = 0,
) -> Backend:
    """An artifact folder on the chosen runtime and precision (bf16 and int8 only past their gate)."""
    settings = Settings.from_env()
    chosen = choose_runtime(runtime, providers or settings.providers)
    if chosen == "onnxruntime":
        choose_precision(precision, chosen)  # refuses bf16 and int8 here, with what to do
        from worker.pipeline import OnnxEditPipeline

        return OnnxEditPipeline(folder, providers, device_id)
    chosen_precision = choose_precision(precision, chosen)
    if chosen_precision in MIN_PSNR_SETTINGS:
        return gated(folder, chosen_precision, settings, auto=precision == "auto")
    from worker.openvino_runtime import OpenVinoEditPipeline

    return OpenVinoEditPipeline(folder, "fp32", settings.cache_dir)
