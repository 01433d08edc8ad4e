"""Which runtime and precision run an artifact folder, and the numbers that allow bf16.

- Runtime: `onnxruntime` (TensorRT, CUDA or CPU execution providers) or `openvino` (CPUs). `auto` picks
  OpenVINO on an x86 CPU that has it installed (`pip install 'itsd[openvino]'`) when ONNX Runtime has no GPU
  provider to use, else ONNX Runtime.
- Precision: `fp32` or `bf16` (OpenVINO only). `auto` is bf16 where the CPU computes it natively
  (AVX512-BF16 or AMX), else fp32.
- bf16 is gated by numbers: the first time a model is loaded in bf16 on a machine, one probe edit runs in
  fp32 and in bf16, and bf16 is refused below ITSD_BF16_MIN_PSNR dB (35), with one line that says so: the
  model runs in fp32. The measurement is kept under ITSD_CACHE_DIR/openvino, by model id.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from core.edit import Backend, Tiling, edit_image
from core.errors import InvalidParameters
from core.images import psnr
from core.params import EditParams
from core.settings import PRECISIONS, RUNTIMES, Settings
from core.storage import write_atomic

log = logging.getLogger(__name__)
GATE_PROBE = EditParams(steps=4, seed=0)  # a short edit: bf16's drift shows in every step's prediction


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


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
    if requested not in PRECISIONS:
        raise InvalidParameters(f"precision {requested!r}: use {', '.join(PRECISIONS)}")
    if requested == "bf16" and runtime != "openvino":
        raise InvalidParameters("bf16 runs on the openvino runtime: add --runtime openvino")
    if requested == "auto":
        return "bf16" if runtime == "openvino" and native_bf16() else "fp32"
    return requested


def check_choice(runtime: str, precision: str, providers: tuple[str, ...]) -> None:
    """Refuse, before anything loads, a runtime that is not installed or bf16 on ONNX Runtime. `auto`
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
    edits = [np.asarray(edit_image(b, image, "Make it brighter", GATE_PROBE, Tiling()).image) for b in (fp32, other)]
    return psnr(*edits)


def gated_bf16(folder: Path, settings: Settings) -> Backend:
    """The model in bf16 if its probe edit stays within ITSD_BF16_MIN_PSNR of fp32, else in fp32."""
    from worker.openvino_runtime import OpenVinoEditPipeline

    bf16 = OpenVinoEditPipeline(folder, "bf16", settings.cache_dir)
    record = settings.cache_dir / "openvino" / f"{bf16.manifest.model_id}.bf16.json"
    fp32: Backend | None = None
    if record.is_file():
        measured = float(json.loads(record.read_text())["psnr_db"])
    else:
        fp32 = OpenVinoEditPipeline(folder, "fp32", settings.cache_dir)
        measured = probe_psnr(fp32, bf16)
        write_atomic(record, json.dumps({"psnr_db": round(measured, 2), "probe": GATE_PROBE.to_dict()}).encode())
    if measured >= settings.bf16_min_psnr:
        return bf16
    log.warning(
        "%s: bf16 is %.1f dB from fp32 on the probe edit, under ITSD_BF16_MIN_PSNR (%g): running fp32",
        folder.name,
        measured,
        settings.bf16_min_psnr,
    )
    return fp32 or OpenVinoEditPipeline(folder, "fp32", settings.cache_dir)


def load_artifacts(
    folder: Path,
    runtime: str = "auto",
    precision: str = "auto",
    providers: tuple[str, ...] | None = None,
    device_id: int = 0,
) -> Backend:
    """An artifact folder on the chosen runtime and precision (bf16 only past its gate)."""
    settings = Settings.from_env()
    chosen = choose_runtime(runtime, providers or settings.providers)
    if chosen == "onnxruntime":
        choose_precision(precision, chosen)  # refuses bf16 here, with what to do
        from worker.pipeline import OnnxEditPipeline

        return OnnxEditPipeline(folder, providers, device_id)
    if choose_precision(precision, chosen) == "bf16":
        return gated_bf16(folder, settings)
    from worker.openvino_runtime import OpenVinoEditPipeline

    return OpenVinoEditPipeline(folder, "fp32", settings.cache_dir)
