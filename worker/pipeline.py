"""InstructPix2Pix's model calls over ONNX Runtime sessions, in numpy: no torch, no diffusers.

`core.edit` runs the (tiled) sampling loop; `worker.artifacts.ArtifactPipeline` supplies the model calls
and facts; this class runs the graphs on ONNX Runtime's execution providers (TensorRT, CUDA, CPU).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.errors import ProviderError
from core.manifest import COMPONENTS
from core.settings import Settings
from worker import providers
from worker.artifacts import ArtifactPipeline, check_inputs

log = logging.getLogger(__name__)


class OnnxEditPipeline(ArtifactPipeline):
    """An artifact folder on ONNX Runtime sessions. Not thread-safe: one per process."""

    runtime = "onnxruntime"

    def __init__(self, folder: Path, provider_names: tuple[str, ...] | None = None, device_id: int = 0) -> None:
        super().__init__(folder)
        m, settings = self.manifest, Settings.from_env()
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, spec in COMPONENTS.items():
            chosen = providers.choose(
                provider_names or settings.providers,
                device_id=device_id,
                trt_profile=m.tensorrt_profiles.get(name),
                fp16=m.component_dtypes[name] == "fp16",
                cache_dir=settings.cache_dir,
                asked=provider_names is not None or settings.providers_asked,
            )
            self.sessions[name] = sess = providers.session(folder / spec.filename, chosen)
            check_inputs(folder / spec.filename, [i.name for i in sess.get_inputs()], spec)

    @property
    def label(self) -> str:
        return f"onnxruntime {self.sessions['unet'].get_providers()[0]}"

    @property
    def max_unet_batch(self) -> int | None:  # type: ignore[override]
        """TensorRT builds the UNet's engine for the batch range in the manifest; other providers take any."""
        if self.sessions["unet"].get_providers()[0] != "TensorrtExecutionProvider":
            return None
        return self.manifest.tensorrt_profiles.get("unet", {}).get("sample", {}).get("max", [None])[0]

    @classmethod
    def load(cls, model: str) -> OnnxEditPipeline:
        return cls(Path(model))

    def _call(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.sessions[name].run(None, inputs)[0]
        except Exception as exc:  # onnxruntime's errors (device OOM, provider faults) share no base class
            raise ProviderError(f"{name}: {str(exc).splitlines()[0]}") from exc
