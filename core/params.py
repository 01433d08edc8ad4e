"""Edit parameters: one frozen dataclass, validated once, shared by `edit`, `submit` and `run`.

Steps, the two guidance scales and max_side may be left unset (None): the model's own defaults then apply,
from `edit_defaults.json` in its checkpoint (copied into the artifact manifest by export), else the
project's (`PROJECT_DEFAULTS`; no max_side: the input's own size). `core.edit` resolves them
(`EditParams.resolve`) just before it edits, so a job keeps "the model's default", and its id stays that of
the model it was submitted for (whose hash covers the file).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from core.errors import InvalidModel, InvalidParameters

# Scheduler names the CLI accepts, mapped to the diffusers class each one ports.
SCHEDULERS = {
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm-multistep": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",  # for LCM-distilled weights (an LCM-LoRA fused in): a few steps, low guidance
}
LATENT_MULTIPLE = 64  # working images are padded to multiples of 64: the UNet halves the 1/8 latent three times
MAX_SIDE = 65_536  # --max-side's ceiling; the pixel limit (ITSD_MAX_PIXELS) is what bounds an image
EDIT_DEFAULTS_FILE = "edit_defaults.json"  # in a checkpoint folder: the settings its makers recommend
PROJECT_DEFAULTS: dict[str, float] = {
    "steps": 20,  # the blog's validation setting; diffusers' pipeline default of 100 is 5x slower
    "guidance_scale": 7.0,  # text guidance
    "image_guidance_scale": 1.5,  # how closely the output follows the input image
    "detail": 1.0,  # of the tiled pass's finer scale on top of the whole photo's view (core.overview): all of it
    "guidance_until": 1.0,  # the fraction of the steps that run classifier-free guidance: all of them
}
KEEP = ("all", "no-gps", "none")  # of the photo's metadata (core.metadata), what an output keeps
# What a model's edit_defaults.json may set: a few-step model (an LCM-LoRA fused in) carries its sampler too.
MODEL_DEFAULTS = (*PROJECT_DEFAULTS, "max_side", "scheduler")


MAX_GUIDANCE = 100  # far above any useful scale (7.5 is usual, 20 already burns); 1e308 overflowed to NaN


@dataclass(frozen=True)
class Limit:
    whole: bool  # an integer (bools are not); else any finite number
    low: float  # inclusive
    high: float  # inclusive

    @property
    def span(self) -> str:
        """The range as people read it: `1..1000`, `0..100`."""
        show = (lambda x: str(int(x))) if self.whole else (lambda x: f"{x:g}")
        return f"{show(self.low)}..{show(self.high)}"


# Each numeric edit parameter's kind and range, declared once: EditParams checks them, the CLI's options
# (producer.options) and manifest cells (producer.sources) parse by them.
LIMITS = {
    "steps": Limit(True, 1, 1000),
    "guidance_scale": Limit(False, 0, MAX_GUIDANCE),
    "image_guidance_scale": Limit(False, 0, MAX_GUIDANCE),
    "seed": Limit(True, 0, 2**63 - 1),
    "max_side": Limit(True, LATENT_MULTIPLE, MAX_SIDE),
    "detail": Limit(False, 0, 1),
    "guidance_until": Limit(False, 0, 1),
}


@dataclass(frozen=True)
class EditParams:
    steps: int | None = None  # None: the model's default, else PROJECT_DEFAULTS (as the two scales)
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    seed: int | None = None  # None: a fresh seed per image, reported in the result
    scheduler: str | None = None  # None: the checkpoint's own scheduler
    max_side: int | None = None  # None: the model works at the input's own size (in tiles), unless the model's
    # defaults set one; else the longest side it works at, the output resized back to the input's size
    detail: float | None = None  # 0..1: how much of the tiles' finer scale an image of several tiles takes on top
    # of its global view (0: the view enlarged); None: the model's default, else 1
    guidance_until: float | None = None  # 0..1: the fraction of the steps, from the first, that run guided; the
    # rest run the text+image copy alone (a third of a 3-copy step's UNet work); None: the model's default, else 1
    metadata: str = "all"  # of KEEP: what the output keeps of the photo's EXIF, XMP and IPTC (--strip-gps: no-gps,
    # --strip-metadata: none); left out of the JSON when "all", so jobs (and their ids) from before it stay the same

    def __post_init__(self) -> None:
        problems = []
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int if limit.whole else int | float):
                problems.append(f"{name} must be {'an integer' if limit.whole else 'a number'}, got {value!r}")
            elif not limit.whole and not math.isfinite(value):  # (an int is; a huge one would not fit a float)
                problems.append(f"{name} must be finite, got {value!r}")
            elif not limit.low <= value <= limit.high:
                problems.append(f"{name} must be {limit.span}, got {value}")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            problems.append(f"scheduler must be a name, got {self.scheduler!r}")
        elif self.scheduler is not None and self.scheduler not in SCHEDULERS:
            problems.append(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if self.metadata not in KEEP:
            problems.append(f"metadata must be one of {', '.join(KEEP)}, got {self.metadata!r}")
        if problems:
            raise InvalidParameters("; ".join(problems))

    def resolve(self, model_defaults: Mapping[str, Any]) -> EditParams:
        """These parameters with every unset one taken from the model's defaults, else the project's."""
        chosen = {**PROJECT_DEFAULTS, "max_side": None, "scheduler": None, **model_defaults}
        return replace(self, **{name: chosen[name] for name in MODEL_DEFAULTS if getattr(self, name) is None})

    @property
    def guided(self) -> bool:
        """Whether 3-way classifier-free guidance runs (diffusers: gs > 1 and igs >= 1); resolved params only."""
        if self.guidance_scale is None or self.image_guidance_scale is None:
            raise ValueError("guidance is unresolved: call EditParams.resolve first")
        return self.guidance_scale > 1.0 and self.image_guidance_scale >= 1.0

    @property
    def guided_steps(self) -> int:
        """How many of the steps, from the first, run guided (all of them unless `guidance_until` < 1; none when
        unguided); resolved params only. A fraction of the steps is rounded up: 0.4 of 20 is 8, 0.3 of 4 is 2."""
        if self.steps is None or self.guidance_until is None:
            raise ValueError("steps are unresolved: call EditParams.resolve first")
        return math.ceil(round(self.guidance_until * self.steps, 6)) if self.guided else 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["metadata"] == "all":
            del data["metadata"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidParameters(f"unknown edit parameter(s): {', '.join(sorted(unknown))}")
        return cls(**data)


def check_edit_defaults(data: Any, where: str) -> dict[str, Any]:
    """A model's edit defaults, validated: only the fields of `MODEL_DEFAULTS`, with valid values."""
    if not isinstance(data, dict):
        raise InvalidModel(f"{where}: edit defaults must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(MODEL_DEFAULTS))
    if unknown:
        raise InvalidModel(
            f"{where}: unknown edit default(s) {', '.join(unknown)}; a model may set {', '.join(MODEL_DEFAULTS)}"
        )
    try:
        EditParams(**data)
    except InvalidParameters as exc:
        raise InvalidModel(f"{where}: {exc}") from None
    return dict(data)


def read_edit_defaults(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint folder's `edit_defaults.json`, validated; {} when it has none."""
    path = checkpoint / EDIT_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{path}: unreadable: {exc}") from None
    return check_edit_defaults(data, str(path))
