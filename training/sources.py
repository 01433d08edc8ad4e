"""Where pairs come from. Each source lists its *units* (a photo, or an input/target pair of files) by a
stable key, and turns one unit into examples: aligned (input, target) crops for one task.

- `PhotoSource`: a folder of photos; a teacher makes each target from the cropped photo.
- `PairSource`: paired folders matched by relative path and file stem (Rain13k, SIDD, LOL, REDS layouts).
- `SyntheticSource`: clean photos; a seeded degradation of the crop is the input, the crop the target. A task
  with a teacher instead (cartoonization) takes the clean crop as input and the teacher's output as target,
  so one dataset can mix restoration and teacher tasks. A share of restoration rows (`untouched`) has nothing
  of its task to undo, and its target is its input: the clean crop, or the crop with another restoration
  task's damage ("remove the rain" leaves a dark photo dark). Without such rows every input shows its task (a
  degraded photo: that damage; a clean one: the teacher's edit), and a model trained on them learns to ignore
  the instruction; with clean ones only, it learns "restore" from "restyle" but not which damage to undo.
All randomness comes from `rng_for(seed, key, ...)`, so a unit gives the same examples in any order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ImageTooLarge, InputNotFound, InvalidImage
from core.images import read_image_file
from core.inputs import IMAGE_SUFFIXES
from training.dataset import Crop, aligned_crop
from training.degrade import ALSO_DAMAGES, Ranges, degrade
from training.teachers import Teacher, TeacherFailed
from training.templates import rng_for

# Errors that skip one unit (reported with their reason); anything else stops the run.
SKIPPABLE = (InvalidImage, ImageTooLarge, InputNotFound, TeacherFailed)


@dataclass(frozen=True)
class Unit:
    key: str  # relative path without suffix: decides the split and seeds the randomness
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class Example:
    key: str  # unit key plus sample index: seeds the instruction choice
    task: str
    input: np.ndarray  # uint8 HxWx3 RGB
    target: np.ndarray


def find_images(folder: Path) -> dict[str, Path]:
    """Images under `folder` (recursively), by key: relative path without suffix."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in found}


def load(path: Path) -> np.ndarray:
    try:
        return np.asarray(read_image_file(path))
    except (InvalidImage, ImageTooLarge, InputNotFound) as exc:
        raise type(exc)(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


def _strip(key: str, affixes: tuple[str, ...]) -> str:
    folder, _, stem = key.rpartition("/")
    for affix in affixes:
        stem = stem.replace(affix, "")
    return f"{folder}/{stem}" if folder else stem


class PhotoSource:
    def __init__(self, folder: Path, teacher: Teacher, task: str) -> None:
        self.folder, self.teacher, self.task = folder, teacher, task
        self.units = [Unit(key, (path,)) for key, path in find_images(folder).items()]
        self.tasks = {task: 1.0}

    def examples(self, unit: Unit, crop: Crop, seed: int, samples: int) -> Iterator[Example]:
        photo = load(unit.paths[0])
        for i in range(samples):
            (patch,) = aligned_crop([photo], crop, rng_for(seed, "crop", unit.key, i))
            yield Example(f"{unit.key}#{i}", self.task, patch, self.teacher(np.ascontiguousarray(patch)))


class PairSource:
    def __init__(self, inputs: Path, targets: Path, task: str, strip: tuple[str, ...] = ()) -> None:
        sources = {_strip(k, strip): p for k, p in find_images(inputs).items()}
        goals = {_strip(k, strip): p for k, p in find_images(targets).items()}
        self.units = [Unit(key, (sources[key], goals[key])) for key in sources if key in goals]
        self.unmatched_inputs = sorted(set(sources) - set(goals))
        self.unmatched_targets = sorted(set(goals) - set(sources))
        self.task, self.tasks = task, {task: 1.0}

    def examples(self, unit: Unit, crop: Crop, seed: int, samples: int) -> Iterator[Example]:
        source, target = load(unit.paths[0]), load(unit.paths[1])
        for i in range(samples):
            patches = aligned_crop([source, target], crop, rng_for(seed, "crop", unit.key, i))
            yield Example(f"{unit.key}#{i}", self.task, *patches)


class SyntheticSource:
    def __init__(
        self,
        folder: Path,
        tasks: dict[str, float],
        teachers: dict[str, Teacher] | None = None,
        untouched: float = 0.0,
        ranges: Ranges | None = None,
    ) -> None:
        self.folder, self.tasks, self.teachers, self.untouched = folder, tasks, teachers or {}, untouched
        self.ranges = ranges or {}
        self.units = [Unit(key, (path,)) for key, path in find_images(folder).items()]
        total = sum(tasks.values())
        self.names, self.weights = list(tasks), np.array([w / total for w in tasks.values()])

    def foreign_damage(self, task: str, rng: np.random.Generator) -> str | None:
        """For an untouched row of `task`: another restoration task of this source whose damage leaves `task`
        nothing to undo, or None (the clean crop), drawn evenly."""
        others = [o for o in self.names if o not in self.teachers and o != task and task not in ALSO_DAMAGES.get(o, ())]
        choice = int(rng.integers(len(others) + 1))
        return others[choice] if choice < len(others) else None

    def examples(self, unit: Unit, crop: Crop, seed: int, samples: int) -> Iterator[Example]:
        photo = load(unit.paths[0])
        for i in range(samples):
            rng = rng_for(seed, "synthetic", unit.key, i)
            task = self.names[int(rng.choice(len(self.names), p=self.weights))]
            (clean,) = aligned_crop([photo], crop, rng)  # degrade after cropping: noise and streaks keep their scale
            clean = np.ascontiguousarray(clean)
            if task in self.teachers:
                yield Example(f"{unit.key}#{i}", task, clean, self.teachers[task](clean))
                continue
            if self.untouched and rng.random() < self.untouched:
                other = self.foreign_damage(task, rng)
                untouched = degrade(clean, other, rng, self.ranges)[0] if other else clean
                yield Example(f"{unit.key}#{i}", task, untouched, untouched)
                continue
            degraded, _, _ = degrade(clean, task, rng, self.ranges)
            yield Example(f"{unit.key}#{i}", task, degraded, clean)


Source = PhotoSource | PairSource | SyntheticSource


def produce(source: Source, unit: Unit, crop: Crop, seed: int, samples: int) -> list[Example] | str:
    """All examples of one unit, or why it was skipped, naming the file (the unit is all or nothing)."""
    try:
        return list(source.examples(unit, crop, seed, samples))
    except SKIPPABLE as exc:
        reason = str(exc)
        return reason if any(str(path) in reason for path in unit.paths) else f"{unit.paths[0]}: {reason}"
