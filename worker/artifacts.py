"""What every runtime's pipeline over an artifact folder shares: the model's facts and tokenizer from its
manifest, the dtype each component takes, per-component timings, and the four model calls `core.edit`
needs. A runtime supplies only `_call(name, inputs)`: ONNX Runtime (`worker/pipeline.py`) or OpenVINO
(`worker/openvino_runtime.py`), over the same ONNX files.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.edit import ModelFacts
from core.errors import InvalidModel
from core.manifest import SCHEDULER_FILE, TOKENIZER_DIR, ComponentSpec, Manifest
from worker.tokenizer import ClipTokenizer

_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def check_inputs(path: Path, names: list[str], spec: ComponentSpec) -> None:
    """A graph whose inputs are not the manifest's (another export's file dropped in) is not this model."""
    if names != [t.name for t in spec.inputs]:
        raise InvalidModel(f"{path}: inputs {names} do not match the manifest's {spec.name}")


class ArtifactPipeline:
    """Loads an artifact folder's manifest; `core.edit.edit_image` edits with it. One per process."""

    runtime = "?"  # which runtime runs the graphs, for logs and results

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = m = Manifest.read(folder)
        self.edit_defaults = m.edit_defaults
        self.facts = ModelFacts(
            latent_channels=m.latent_channels,
            vae_scale_factor=m.vae_scale_factor,
            latent_scaling_factor=m.latent_scaling_factor,
            tile_size=m.tile_size,
            scheduler_config=json.loads((folder / SCHEDULER_FILE).read_text()),
        )
        self.tokenizer = ClipTokenizer(folder / TOKENIZER_DIR / "tokenizer.json", m.max_text_length, m.pad_token_id)
        self.dtypes = {name: _NUMPY_DTYPES[dtype] for name, dtype in m.component_dtypes.items()}
        self.timings: dict[str, float] = defaultdict(float)  # seconds per component, summed over calls
        self.encode_text = lru_cache(maxsize=64)(self._encode_text_uncached)  # token states, (1, length, width)

    max_unet_batch: int | None = None  # the largest UNet batch the runtime takes, if it has a bound

    @property
    def label(self) -> str:
        """The runtime and what it runs on (or in), for results and logs."""
        raise NotImplementedError

    def _call(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _run(self, name: str, **inputs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        output = self._call(name, inputs)
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
