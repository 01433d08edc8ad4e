"""InstructPix2Pix's model calls over ONNX Runtime sessions, in numpy: no torch, no diffusers.

`core.edit` runs the (tiled) sampling loop; this class supplies the four model calls it needs and the
model's facts, from an artifact folder's manifest.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.edit import ModelFacts
from core.errors import InvalidModel, ProviderError
from core.manifest import COMPONENTS, SCHEDULER_FILE, TOKENIZER_DIR, Manifest
from core.settings import Settings
from worker import providers
from worker.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)
_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class OnnxEditPipeline:
    """Loads an artifact folder once; `core.edit.edit_image` edits with it. Not thread-safe: one per process."""

    def __init__(self, folder: Path, provider_names: tuple[str, ...] | None = None, device_id: int = 0) -> None:
        self.folder = folder
        self.manifest = m = Manifest.read(folder)
        self.edit_defaults = m.edit_defaults
        settings = Settings.from_env()
        self.facts = ModelFacts(
            latent_channels=m.latent_channels,
            vae_scale_factor=m.vae_scale_factor,
            latent_scaling_factor=m.latent_scaling_factor,
            tile_size=m.tile_size,
            scheduler_config=json.loads((folder / SCHEDULER_FILE).read_text()),
        )
        self.tokenizer = ClipTokenizer(folder / TOKENIZER_DIR / "tokenizer.json", m.max_text_length, m.pad_token_id)
        self.dtypes = {name: _NUMPY_DTYPES[dtype] for name, dtype in m.component_dtypes.items()}
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, spec in COMPONENTS.items():
            chosen = providers.choose(
                provider_names or settings.providers,
                device_id=device_id,
                trt_profile=m.tensorrt_profiles.get(name),
                fp16=m.component_dtypes[name] == "fp16",
                cache_dir=settings.cache_dir,
            )
            self.sessions[name] = sess = providers.session(folder / spec.filename, chosen)
            names = [i.name for i in sess.get_inputs()]
            if names != [t.name for t in spec.inputs]:
                raise InvalidModel(f"{folder / spec.filename}: inputs {names} do not match the manifest's {spec.name}")
        self.timings: dict[str, float] = defaultdict(float)  # seconds per component, summed over calls
        self.encode_text = lru_cache(maxsize=64)(self._encode_text_uncached)  # token states, (1, length, width)

    @classmethod
    def load(cls, model: str) -> OnnxEditPipeline:
        return cls(Path(model))

    def _run(self, name: str, **inputs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            output = self.sessions[name].run(None, inputs)[0]
        except Exception as exc:  # onnxruntime's errors (device OOM, provider faults) share no base class
            raise ProviderError(f"{name}: {str(exc).splitlines()[0]}") from exc
        self.timings[name] += time.perf_counter() - start
        return output.astype(np.float32, copy=False)

    def _encode_text_uncached(self, text: str) -> np.ndarray:
        return self._run("text_encoder", input_ids=self.tokenizer([text]))

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", sample=pixels.astype(self.dtypes["vae_encoder"]))

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        dtype = self.dtypes["unet"]
        return self._run(
            "unet", sample=sample.astype(dtype), timestep=timestep, encoder_hidden_states=text.astype(dtype)
        )

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", latent=latents.astype(self.dtypes["vae_decoder"]))
