"""Instruction templates, FLAN style: many paraphrases per task, one file per task.

The files live in `training/instructions/<task>.txt` (package data): one paraphrase a line, blank lines
and `# comments` ignored. A dataset either fixes one paraphrase per row, drawn with the seed (as the
InstructPix2Pix cartoonization blog did), or keeps them all so the trainer samples one per step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from core.errors import InvalidParameters

TEMPLATE_DIR = Path(__file__).parent / "instructions"
# Tasks that ship templates. The schema each one is written in is declared in `training.dataset`.
TASKS = ("cartoonization", "low_light", "denoise", "derain", "deblur")


def load_templates(task: str, directory: Path | None = None) -> list[str]:
    """The unique paraphrases for `task`, in file order. `directory` overrides the shipped templates."""
    path = (directory or TEMPLATE_DIR) / f"{task}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in (directory or TEMPLATE_DIR).glob("*.txt"))
        raise InvalidParameters(f"no instruction templates for task {task!r} ({path}); known: {', '.join(known)}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    templates = list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
    if not templates:
        raise InvalidParameters(f"{path} holds no instructions")
    return templates


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """A generator that depends only on the seed and a stable key, never on processing order."""
    digest = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def pick_template(templates: list[str], seed: int, key: str) -> str:
    """One paraphrase for the sample called `key`, the same for the same seed."""
    return templates[int(rng_for(seed, "instruction", key).integers(len(templates)))]
