"""InstructPix2Pix's model calls on OpenVINO, from the same ONNX files ONNX Runtime runs.

On CPUs OpenVINO runs these graphs faster, and in bf16 where the CPU has native bf16 (AVX512-BF16 or AMX)
about twice as fast again; in int8 the UNet is read from its copy with int8 weights (`worker.int8`). Each
graph is compiled for the exact shapes it is called with (static shapes: a tile's, in a batch of
`--tile-batch` tiles times the guidance copies), once per shape, and the compiled model is cached on disk
under ITSD_CACHE_DIR/openvino, so a worker's second start compiles nothing.

Performance hint: LATENCY, on the worker too. Calls are made one at a time (jobs batched together on
threads, `worker.batching`, make one call of their UNet inputs), and THROUGHPUT would split the cores into
streams that a single call cannot use together.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from core.errors import InvalidModel, ProviderError
from core.manifest import COMPONENTS
from core.settings import Settings
from worker.artifacts import ArtifactPipeline, check_inputs

log = logging.getLogger(__name__)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: int8 weights, fp32 arithmetic


class OpenVinoEditPipeline(ArtifactPipeline):
    """An artifact folder on OpenVINO's CPU plugin, in `precision` (fp32, bf16, or int8: the UNet's weights
    compressed by `worker.int8`, once per model and machine). One per process."""

    runtime = "openvino"

    def __init__(self, folder: Path, precision: str = "fp32", cache_dir: Path | None = None) -> None:
        super().__init__(folder)
        self.precision = precision
        self.core = ov.Core()
        cache = (cache_dir or Settings.from_env().cache_dir) / "openvino"
        self.config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "CACHE_DIR": str(cache),
        }
        self.sources = {name: folder / spec.filename for name, spec in COMPONENTS.items()}
        if precision == "int8":
            from worker.int8 import cached_int8_unet

            self.sources["unet"] = cached_int8_unet(self.sources["unet"], self.manifest.model_id, cache)
        self.compiled: dict[tuple[str, tuple[tuple[int, ...], ...]], ov.CompiledModel] = {}
        self._lock = threading.Lock()  # a compiled model's call is not thread-safe (jobs batched on threads)

    @property
    def label(self) -> str:
        return f"openvino {self.precision}"

    def compiled_for(self, name: str, inputs: dict[str, np.ndarray]) -> ov.CompiledModel:
        """The graph compiled for these inputs' shapes: compiled (or read from the disk cache) on first use.
        The graph is read from its file each time and dropped once compiled: only compiled graphs are kept (an
        SD1.5 UNet is 3.4 GB as read, and again as compiled)."""
        key = (name, tuple(value.shape for value in inputs.values()))
        if key not in self.compiled:
            spec, path = COMPONENTS[name], self.sources[name]
            try:
                model = self.core.read_model(str(path))
            except RuntimeError as exc:
                raise InvalidModel(f"{path}: OpenVINO cannot read it: {str(exc).splitlines()[0]}") from None
            check_inputs(path, [port.get_any_name() for port in model.inputs], spec)
            model.reshape({input_name: ov.PartialShape(list(value.shape)) for input_name, value in inputs.items()})
            self.compiled[key] = self.core.compile_model(model, "CPU", self.config)
        return self.compiled[key]

    def _call(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        try:
            with self._lock:
                return self.compiled_for(name, inputs)(inputs)[0]
        except RuntimeError as exc:
            raise ProviderError(f"{name} (OpenVINO): {str(exc).splitlines()[0]}") from exc
