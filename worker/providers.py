"""Choosing ONNX Runtime execution providers: TensorRT, then CUDA, then CPU, with fallbacks logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnxruntime as ort

from core.errors import InvalidModel, InvalidParameters

log = logging.getLogger(__name__)
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_reported: set[tuple[str, ...]] = set()  # provider sets already warned about in this process


def shape_string(shapes: dict[str, list[int]]) -> str:
    """TensorRT's profile format: `name:1x8x64x64,other:...`."""
    return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in shapes.items())


def choose(
    preferred: tuple[str, ...],
    device_id: int = 0,
    trt_profile: dict[str, dict[str, list[int]]] | None = None,
    fp16: bool = False,
    cache_dir: Path | None = None,
    asked: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """Providers to ask for, in order, with their options; the CPU is always the last resort. One this build
    lacks is a warning where the user `asked` for it (--device cuda, ITSD_PROVIDERS), else a debug line: the
    default order names GPU providers that a CPU-only build never has."""
    available = set(ort.get_available_providers())
    unknown = [p for p in preferred if p not in ort.get_all_providers()]
    if unknown:
        raise InvalidParameters(f"unknown execution provider(s): {', '.join(unknown)}")
    missing = tuple(p for p in preferred if p not in available)
    if missing and not asked:
        log.debug("not in this onnxruntime build, skipped: %s", ", ".join(missing))
    elif missing and missing not in _reported:
        _reported.add(missing)
        log.warning("not in this onnxruntime build, skipped: %s", ", ".join(missing))
    chosen: list[tuple[str, dict[str, Any]]] = []
    for name in preferred:
        if name not in available:
            continue
        options: dict[str, Any] = {}
        if name in GPU_PROVIDERS:
            options["device_id"] = device_id
        if name == "TensorrtExecutionProvider":
            options |= {"trt_fp16_enable": fp16}
            if cache_dir is not None:
                options |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir / "trt")}
            if trt_profile:
                for bound in ("min", "opt", "max"):
                    options[f"trt_profile_{bound}_shapes"] = shape_string(
                        {name: dims[bound] for name, dims in trt_profile.items()}
                    )
        chosen.append((name, options))
    if not chosen or chosen[-1][0] != CPU:
        chosen.append((CPU, {}))
    return chosen


def session(path: Path, providers: list[tuple[str, dict[str, Any]]], threads: int = 0) -> ort.InferenceSession:
    """An InferenceSession with full graph optimisation; warns when it fell back from the first choice."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=[name for name, _ in providers],
            provider_options=[opts for _, opts in providers],
        )
    except Exception as exc:  # onnxruntime's pybind errors share no useful base class
        raise InvalidModel(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None
    wanted, got = providers[0][0], sess.get_providers()[0]
    if got != wanted:
        log.warning("%s: wanted %s, running on %s (fallback)", path.name, wanted, got)
    return sess
