"""Build an instruction-prompted (FLAN style) dataset: `DatasetSpec` says what to build, `build_dataset` builds it.

The library behind `itsd prepare` (training.prepare_cli) and the itsd-tiny recipe. Every mistake in a spec is
an `InvalidParameters` naming the option that `itsd prepare` takes for it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.errors import InvalidParameters
from core.inputs import IMAGE_SUFFIXES
from training.dataset import (
    CHOICES_COLUMN,
    SCHEMAS,
    SOURCE_COLUMN,
    TASK_COLUMN,
    Crop,
    DatasetWriter,
    features,
    png,
    schema_for,
    split_of,
)
from training.degrade import TASK_DEGRADATIONS, Ranges, check_ranges
from training.sources import PairSource, PhotoSource, Source, SyntheticSource, produce
from training.teachers import BUILTIN_TEACHERS, CommandTeacher, OnnxTeacher, Teacher, cartoon
from training.templates import load_templates, pick_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: exactly one source (photos + teacher, paired folders, or clean photos to degrade), its
    tasks and paraphrases, how crops are cut, how photos split, and the columns. Defaults are `itsd prepare`'s."""

    photos: Path | None = None  # a teacher makes each target
    pairs: tuple[Path, Path] | None = None  # (inputs, targets), matched by relative path and stem
    clean: Path | None = None  # degraded synthetically (seeded)
    tasks: dict[str, float] = field(default_factory=dict)  # task -> weight; {} is each source's default
    teacher_onnx: Path | None = None
    onnx_range: str = "unit"
    teacher_command: str | None = None
    pair_strip: tuple[str, ...] = ()
    paraphrases: str = "fixed"  # fixed: one per row; all: also every paraphrase, for sampling at train time
    templates_dir: Path | None = None
    untouched: float = 0.0
    ranges: Ranges = field(default_factory=dict)
    resolution: int = 256
    crop_mode: str = "random"
    resize: bool = True
    samples_per_image: int = 1
    seed: int = 0
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    schema_name: str | None = None
    original_image_column: str | None = None
    edit_prompt_column: str | None = None
    edited_image_column: str | None = None
    fmt: str = "arrow"

    @property
    def fractions(self) -> dict[str, float]:
        validation, test = self.validation_fraction, self.test_fraction
        return {"train": 1.0 - validation - test, "validation": validation, "test": test}


DEFAULTS = DatasetSpec()


def build_source(spec: DatasetSpec) -> Source:
    """The spec's one source, with its teacher or degradations; InvalidParameters when options do not go together."""
    if sum(x is not None and x != () for x in (spec.photos, spec.pairs, spec.clean)) != 1:
        raise InvalidParameters("give exactly one source: --photos, --pairs or --clean")
    if (spec.teacher_onnx or spec.teacher_command) and not spec.photos:
        raise InvalidParameters("--teacher-onnx and --teacher-command go with --photos")
    if spec.untouched and not spec.clean:
        raise InvalidParameters("--untouched goes with --clean")
    if spec.ranges and not spec.clean:
        raise InvalidParameters("--degradation-range goes with --clean")
    try:
        check_ranges(spec.ranges)
    except ValueError as exc:
        raise InvalidParameters(f"--degradation-range: {exc}") from None
    if spec.clean:
        tasks = spec.tasks or dict.fromkeys(TASK_DEGRADATIONS, 1.0)
        known = [*TASK_DEGRADATIONS, *BUILTIN_TEACHERS]
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            raise InvalidParameters(
                f"no degradation or teacher for task(s) {', '.join(unknown)}; choose from {', '.join(known)}"
            )
        return SyntheticSource(spec.clean, tasks, BUILTIN_TEACHERS, spec.untouched, spec.ranges)
    if len(spec.tasks) > 1:
        raise InvalidParameters("a mixture of tasks needs --clean; --photos and --pairs take one --task")
    if spec.pairs:
        if not spec.tasks:
            raise InvalidParameters("--pairs needs --task (e.g. derain, denoise, low_light, deblur)")
        return PairSource(spec.pairs[0], spec.pairs[1], next(iter(spec.tasks)), spec.pair_strip)
    if spec.teacher_onnx and spec.teacher_command:
        raise InvalidParameters("give one teacher: --teacher-onnx or --teacher-command")
    teacher: Teacher = (
        OnnxTeacher(spec.teacher_onnx, spec.onnx_range)
        if spec.teacher_onnx
        else CommandTeacher(spec.teacher_command)
        if spec.teacher_command
        else cartoon
    )
    return PhotoSource(spec.photos, teacher, next(iter(spec.tasks), "cartoonization"))


def check_output_folder(out: Path, overwrite: bool) -> None:
    """OUT must be new or empty, or (with overwrite) a dataset this module wrote: never delete anything else."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InvalidParameters(f"{out} exists and is not empty (use --overwrite to replace it)")
        if not (out / "summary.json").is_file():
            raise InvalidParameters(f"{out} is not a dataset made by itsd prepare; refusing to replace it")


def build_dataset(
    spec: DatasetSpec,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    report: Callable[[str], None] = log.warning,
) -> dict[str, Any]:
    """Write the dataset (train/validation/test) and `summary.json` to OUT; return the summary.

    A photo or pair that cannot be read or edited is skipped, reported through `report` and counted."""
    if spec.validation_fraction + spec.test_fraction > 1:
        raise InvalidParameters("--validation-fraction plus --test-fraction must be at most 1")
    check_output_folder(out, overwrite)
    source = build_source(spec)
    if not source.units:
        folder = spec.photos or spec.clean or (spec.pairs[0] if spec.pairs else None)
        raise InvalidParameters(f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    templates = {task: load_templates(task, spec.templates_dir) for task in source.tasks}
    base = SCHEMAS[spec.schema_name or schema_for(list(source.tasks))]
    schema = base.override(spec.original_image_column, spec.edit_prompt_column, spec.edited_image_column)
    fractions = spec.fractions
    crop = Crop(spec.resolution, spec.crop_mode, spec.resize)
    every_paraphrase = spec.paraphrases == "all"

    skipped, tally = [], Counter()
    with DatasetWriter(out, features(schema, every_paraphrase), list(fractions), spec.fmt) as writer:
        for unit in tqdm(source.units, desc="prepare", unit="image", disable=not progress):
            made = produce(source, unit, crop, spec.seed, spec.samples_per_image)
            if isinstance(made, str):
                skipped.append({"unit": unit.key, "reason": made})
                report(f"skipped {made}")
                continue
            split = split_of(unit.key, spec.seed, fractions)
            for example in made:
                row = {
                    schema.input_column: png(example.input),
                    schema.instruction_column: pick_template(templates[example.task], spec.seed, example.key),
                    schema.target_column: png(example.target),
                    TASK_COLUMN: example.task,
                    SOURCE_COLUMN: unit.key,
                } | ({CHOICES_COLUMN: templates[example.task]} if every_paraphrase else {})
                writer.write(split, row)
                tally[split, example.task] += 1
    summary = {
        "output": str(out),
        "format": spec.fmt,
        "columns": list(writer.features),
        "seed": spec.seed,
        "degradation_ranges": spec.ranges,
        "rows": writer.rows,
        "tasks": {task: sum(n for (_, t), n in tally.items() if t == task) for task in source.tasks},
        "rows_by_split_and_task": {s: {t: n for (s2, t), n in sorted(tally.items()) if s2 == s} for s in fractions},
        "skipped": len(skipped),
        "skipped_files": skipped,
        "unmatched": {
            "inputs": getattr(source, "unmatched_inputs", []),
            "targets": getattr(source, "unmatched_targets", []),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
