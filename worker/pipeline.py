"""InstructPix2Pix over ONNX Runtime sessions, in numpy: no torch, no diffusers.

The loop is diffusers' `StableDiffusionInstructPix2PixPipeline` step for step: CLIP text embeddings,
image latents from the VAE encoder's mode, 3-way classifier-free guidance with the batch ordered
`[text+image, image only, neither]` and image latents `[img, img, 0]`, then the VAE decoder.
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

from core.edit import initial_latents
from core.errors import InvalidModel, ProviderError
from core.images import to_uint8
from core.manifest import COMPONENTS, SCHEDULER_FILE, TOKENIZER_DIR, Manifest
from core.params import EditParams
from core.settings import Settings
from worker import providers
from worker.schedulers import make_scheduler
from worker.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)
_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class OnnxEditPipeline:
    """Loads an artifact folder once; `generate` runs one edit. Not thread-safe: one per process."""

    def __init__(self, folder: Path, provider_names: tuple[str, ...] | None = None, device_id: int = 0) -> None:
        self.folder = folder
        self.manifest = m = Manifest.read(folder)
        self.edit_defaults = m.edit_defaults
        settings = Settings.from_env()
        self.scheduler_config = json.loads((folder / SCHEDULER_FILE).read_text())
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
        self.timings: dict[str, float] = defaultdict(float)  # seconds per stage, summed over calls
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
        return output

    def _encode_text_uncached(self, text: str) -> np.ndarray:
        return self._run("text_encoder", input_ids=self.tokenizer([text]))

    def generate(self, pixels: np.ndarray, instruction: str, params: EditParams, seed: int) -> np.ndarray:
        m, unet_dtype = self.manifest, self.dtypes["unet"]
        start = time.perf_counter()
        model_time = sum(self.timings.values())
        image_latents = self._run("vae_encoder", sample=pixels.astype(self.dtypes["vae_encoder"])).astype(np.float32)
        text = self.encode_text(instruction)  # a batch shares its instruction: encoded once per process
        if params.guided:
            empty = self.encode_text("")
            embeddings = np.concatenate([text, empty, empty])
            image_latents = np.concatenate([image_latents, image_latents, np.zeros_like(image_latents)])
        else:
            embeddings = text
        embeddings = embeddings.astype(unet_dtype)

        scheduler = make_scheduler(self.scheduler_config, params.scheduler)
        scheduler.set_timesteps(params.steps)
        rng = np.random.default_rng(seed)
        height, width = pixels.shape[2] // m.vae_scale_factor, pixels.shape[3] // m.vae_scale_factor
        latents = initial_latents(rng, (1, m.latent_channels, height, width)) * np.float32(scheduler.init_noise_sigma)
        copies = 3 if params.guided else 1
        for index, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(np.concatenate([latents] * copies), index)
            noise = self._run(
                "unet",
                sample=np.concatenate([model_input, image_latents], axis=1).astype(unet_dtype),
                timestep=np.full(copies, t, dtype=np.float32),
                encoder_hidden_states=embeddings,
            ).astype(np.float32)
            if params.guided:
                text_image, image_only, neither = noise
                noise = (
                    neither
                    + params.guidance_scale * (text_image - image_only)
                    + params.image_guidance_scale * (image_only - neither)
                )[None]
            latents = scheduler.step(noise, index, latents, rng)

        decoded = self._run(
            "vae_decoder", latent=(latents / m.latent_scaling_factor).astype(self.dtypes["vae_decoder"])
        )
        pixels_out = to_uint8(decoded[0])
        elapsed = time.perf_counter() - start
        self.timings["other"] += elapsed - (sum(self.timings.values()) - model_time)
        return pixels_out
