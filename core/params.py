"""Edit parameters: one frozen dataclass, validated once, shared by `edit`, `submit` and `run`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from core.errors import InvalidParameters

# Scheduler names the CLI accepts, mapped to the diffusers class each one ports.
SCHEDULERS = {
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm-multistep": "DPMSolverMultistepScheduler",
}
LATENT_MULTIPLE = 64  # working sizes are multiples of 64: the UNet halves the 1/8 latent three times


@dataclass(frozen=True)
class EditParams:
    steps: int = 20  # the blog's validation setting; diffusers' pipeline default of 100 is 5x slower
    guidance_scale: float = 7.0  # text guidance
    image_guidance_scale: float = 1.5  # how closely the output follows the input image
    seed: int | None = None  # None: a fresh seed per image, reported in the result
    scheduler: str | None = None  # None: the checkpoint's own scheduler
    max_side: int = 512  # longest side the model sees; the output is resized back to the input size

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.steps <= 1000:
            problems.append(f"steps must be 1..1000, got {self.steps}")
        if self.guidance_scale < 0 or self.image_guidance_scale < 0:
            problems.append("guidance scales must be >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            problems.append(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if not LATENT_MULTIPLE <= self.max_side <= 4096:
            problems.append(f"max_side must be {LATENT_MULTIPLE}..4096, got {self.max_side}")
        if problems:
            raise InvalidParameters("; ".join(problems))

    @property
    def guided(self) -> bool:
        """Whether 3-way classifier-free guidance runs (diffusers: gs > 1 and igs >= 1)."""
        return self.guidance_scale > 1.0 and self.image_guidance_scale >= 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidParameters(f"unknown edit parameter(s): {', '.join(sorted(unknown))}")
        return cls(**data)
