"""Numpy ports of the diffusers schedulers the worker offers, built from a checkpoint's scheduler_config.json.

Each port matches its diffusers class within float32 rounding for the settings it accepts, and raises InvalidModel
for a setting that would change results but is not ported. Imports numpy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from core.errors import InvalidModel, InvalidParameters
from core.params import SCHEDULERS
from core.schedulers.ddim import DDIMScheduler
from core.schedulers.dpm import DPMSolverMultistepScheduler
from core.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from core.schedulers.lcm import LCMScheduler


class Scheduler(Protocol):
    """What the denoising loop calls. `step_index` is the loop counter 0..N-1, not the timestep value."""

    timesteps: np.ndarray  # float32, one per step: the values passed to the UNet as `timestep`

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the initial noise (valid after `set_timesteps`)."""
        ...

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Return the sample one step less noisy; `rng` supplies any fresh noise."""
        ...


# diffusers class name -> port; core.params.SCHEDULERS maps the CLI names onto these.
_CLASSES: dict[str, Callable[[Mapping[str, Any]], Scheduler]] = {
    cls.CLASS_NAME: cls
    for cls in (
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        LCMScheduler,
    )
}


def make_scheduler(config: Mapping[str, Any], name: str | None = None) -> Scheduler:
    """The scheduler `name` (a key of core.params.SCHEDULERS), or the config's own `_class_name` when None.

    Like diffusers' `from_config`, a different class reuses the keys it shares with the config (betas, spacing,
    prediction type...) and its own defaults for the rest.
    """
    if name is not None and name not in SCHEDULERS:
        raise InvalidParameters(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    class_name = SCHEDULERS[name] if name is not None else config.get("_class_name")
    if class_name not in _CLASSES:
        raise InvalidModel(f"scheduler class {class_name!r} is not supported; supported: {', '.join(_CLASSES)}")
    return _CLASSES[class_name](config)
