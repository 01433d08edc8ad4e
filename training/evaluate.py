"""Evaluation: edit every test row with every model, score it against its target, next to the input's score.

The untouched input is the identity baseline: a model is only useful where it beats it, so each figure
stands beside the same figure for the input, and `gain_db` is the difference. Where a teacher made the
targets (cartoonization), the target *is* the teacher's output, so the figures read "how close to the
teacher, compared with how close the input already was". Models are backends (`core.backends`), so an
exported artifact folder and a training checkpoint are measured by the same code.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.backends import detect, load_backend
from core.edit import Backend, edit_image
from core.errors import InvalidParameters, ItsdError
from core.params import EditParams
from training.dataset import SCHEMAS, TASK_COLUMN, Schema, as_pil, load_folder
from training.evaluation_report import write_report
from training.metrics import ClipScorer, ClipUnavailable, load_clip, psnr, ssim

TEACHER_TASKS = frozenset({"cartoonization"})  # targets a teacher made: figures are distances to its output
REFERENCE = {True: "teacher output", False: "ground truth"}
EVAL_SEED = 0  # a seed when none is given, so evaluations are reproducible
log = logging.getLogger(__name__)


class EvaluationError(InvalidParameters):
    """A dataset, split, column or model that cannot be evaluated; the message says what to do."""


@dataclass(frozen=True)
class EvaluationSpec:
    """What `itsd evaluate` measures: `models` (name -> artifact folder or diffusers checkpoint) on one split of
    `dataset` (a save_to_disk folder), editing with `params`. Defaults are the command's."""

    dataset: Path
    models: dict[str, str]
    params: EditParams = field(default_factory=EditParams)
    split: str = "test"
    limit: int | None = None  # the first N rows (after `tasks`)
    tasks: tuple[str, ...] = ()  # only rows of these tasks
    instruction: str | None = None  # instead of each row's own
    clip_model: Path | None = None  # a local transformers CLIP folder; without it, CLIP figures are skipped
    grid_rows: int = 8  # examples per task in the grids
    backend: str | None = None  # None: onnx for an artifact folder, torch for a checkpoint
    runtime: str = "auto"  # what runs an artifact folder, chosen as a worker chooses (worker.runtimes)
    precision: str = "auto"
    columns: Schema | None = None  # column names that override the detected schema's (empty ones do not)


@dataclass
class TaskRecord:
    """Everything kept for one task while the loop runs: per-row figures and the first rows' images."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    grid: list[list[Image.Image]] = field(default_factory=list)


def load_split(dataset: Path, split: str) -> tuple[Any, str]:
    """The rows of `split` of a dataset folder (training.dataset.load_folder), and the split's name ("all" for a
    single Dataset, which is used whole)."""
    from datasets import DatasetDict

    try:
        data = load_folder(dataset)
    except FileNotFoundError as exc:
        raise EvaluationError(
            f"{dataset}: not a dataset folder (save_to_disk, or parquet under data/): {exc}"
        ) from None
    if not isinstance(data, DatasetDict):
        return data, "all"
    if split not in data:
        raise EvaluationError(f"{dataset} has no split {split!r}; available splits: {', '.join(data)}")
    return data[split], split


def detect_schema(columns: Sequence[str], overrides: Schema | None = None) -> Schema:
    """The schema whose three columns the dataset has; `overrides` fields that are set win."""
    found = next((s for s in SCHEMAS.values() if {s.input_column, s.target_column} <= set(columns)), None)
    base = found or Schema("", "", "")
    if overrides:
        base = base.override(overrides.input_column, overrides.instruction_column, overrides.target_column)
    missing = [name or "?" for name in (base.input_column, base.target_column) if name not in columns]
    if missing:
        raise EvaluationError(
            f"cannot find the image columns ({', '.join(missing)}) among {', '.join(columns)}; "
            "name them with --original-image-column and --edited-image-column"
        )
    return base


def task_of(row: dict[str, Any], schema: Schema) -> str:
    if row.get(TASK_COLUMN):
        return str(row[TASK_COLUMN])
    return "cartoonization" if schema == SCHEMAS["cartoonization"] else "all"


def score(output: Image.Image, target: Image.Image) -> dict[str, float]:
    a, b = np.asarray(output), np.asarray(target)
    return {"psnr": psnr(a, b), "ssim": ssim(a, b)}


def evaluate(
    rows: Any,
    schema: Schema,
    models: dict[str, Backend],
    params: EditParams,
    *,
    instruction: str | None = None,
    clip: ClipScorer | None = None,
    grid_rows: int = 8,
    quiet: bool = False,
) -> tuple[dict[str, Any], dict[str, list[list[Image.Image]]]]:
    """Score every row with every model. Returns (report without run metadata, grid images per task)."""
    params = params if params.seed is not None else replace(params, seed=EVAL_SEED)
    tasks: dict[str, TaskRecord] = {}
    progress = tqdm(total=len(rows) * len(models), unit="edit", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    for index, row in enumerate(rows):
        source, target = as_pil(row[schema.input_column]), as_pil(row[schema.target_column])
        if target.size != source.size:  # prepared datasets are aligned; others are scored at the input's size
            target = target.resize(source.size, Image.Resampling.BICUBIC)
        text = instruction or str(row.get(schema.instruction_column) or "")
        record = tasks.setdefault(task_of(row, schema), TaskRecord())
        figures: dict[str, Any] = {"index": index, "instruction": text, "identity": score(source, target), "models": {}}
        images = [source]
        for name, backend in models.items():
            output = edit_image(backend, source, text, params).image
            figures["models"][name] = score(output, target)
            if clip is not None:
                figures["models"][name]["clip_image"] = clip.image_similarity(source, output)
                figures["models"][name]["clip_direction"] = clip.direction_similarity(source, output, text)
            images.append(output)
            progress.update()
        record.rows.append(figures)
        if len(record.grid) < grid_rows:
            record.grid.append([*images, target])
    progress.close()
    report = {
        "models": list(models),
        "params": params.to_dict(),  # as asked; unset steps and scales are each model's defaults:
        "params_by_model": {name: params.resolve(backend.edit_defaults).to_dict() for name, backend in models.items()},
        "tasks": {task: summarize(task, record.rows, list(models)) for task, record in tasks.items()},
        "per_row": [{"task": task, **r} for task, record in tasks.items() for r in record.rows],
    }
    return report, {task: record.grid for task, record in tasks.items()}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarize(task: str, rows: list[dict[str, Any]], model_names: list[str]) -> dict[str, Any]:
    """Per-task means: each model's figures, the identity baseline's, and the gains over it."""
    identity = {key: _mean([r["identity"][key] for r in rows]) for key in ("psnr", "ssim")}
    summary: dict[str, Any] = {
        "count": len(rows),
        "reference": REFERENCE[task in TEACHER_TASKS],
        "identity": identity,
        "models": {},
    }
    for name in model_names:
        keys = rows[0]["models"][name].keys()
        means = {key: _mean([r["models"][name][key] for r in rows]) for key in keys}
        means["gain_db"] = means["psnr"] - identity["psnr"]
        means["ssim_gain"] = means["ssim"] - identity["ssim"]
        summary["models"][name] = means
    return summary


def evaluate_models(
    spec: EvaluationSpec, out: Path, *, progress: bool = True, report: Callable[[str], None] = log.warning
) -> dict[str, Any]:
    """Measure the spec's models and write OUT/metrics.json, OUT/metrics.md and OUT/grids/<task>.png; returns
    the report (as in metrics.json). A dataset, split, task or model that cannot be evaluated is an
    EvaluationError before any edit runs."""
    rows, split = load_split(spec.dataset, spec.split)
    schema = detect_schema(rows.column_names, spec.columns)
    if spec.tasks:
        rows = select_tasks(rows, spec.tasks)
    if spec.limit:
        rows = rows.select(range(min(spec.limit, len(rows))))
    if len(rows) == 0:
        raise EvaluationError(f"split {split!r} of {spec.dataset} has no rows")
    backends = load_backends(spec.models, spec.backend, spec.runtime, spec.precision)
    clip, clip_note = clip_or_reason(spec.clip_model)
    if clip is None:
        report(f"CLIP similarity {clip_note}")
    figures, grids = evaluate(
        rows,
        schema,
        backends,
        spec.params,
        instruction=spec.instruction,
        clip=clip,
        grid_rows=spec.grid_rows,
        quiet=not progress,
    )
    result = {
        "dataset": str(spec.dataset),
        "split": split,
        "rows": len(rows),
        "columns": {
            "input": schema.input_column,
            "instruction": schema.instruction_column,
            "target": schema.target_column,
        },
        "models": {
            name: {"path": path, "backend": spec.backend or detect(path), "runtime": backends[name].label}
            for name, path in spec.models.items()
        },
        "clip": clip_note,
    } | {key: value for key, value in figures.items() if key != "models"}
    write_report(out, result, grids)
    return result


def select_tasks(rows: Any, tasks: tuple[str, ...]) -> Any:
    """The rows whose task column names one of `tasks`; a task the split lacks is a one-line error."""
    if TASK_COLUMN not in rows.column_names:
        raise EvaluationError(f"--task needs a '{TASK_COLUMN}' column; the dataset has none")
    present = set(rows[TASK_COLUMN])
    missing = sorted(set(tasks) - present)
    if missing:
        have = ", ".join(sorted(present))
        raise EvaluationError(f"no rows of task(s) {', '.join(missing)}; the split has {have}")
    wanted = set(tasks)
    return rows.select([i for i, task in enumerate(rows[TASK_COLUMN]) if task in wanted])


def load_backends(models: dict[str, str], backend: str | None, runtime: str, precision: str) -> dict[str, Backend]:
    """Every model loaded, an artifact folder on `runtime` and `precision` as a worker loads it; one that cannot be
    is an EvaluationError naming it."""
    loaded = {}
    for name, path in models.items():
        try:
            if (backend or detect(path)) == "onnx":
                from worker.runtimes import load_artifacts

                loaded[name] = load_artifacts(Path(path), runtime, precision)
            else:
                loaded[name] = load_backend(path, backend)
        except (ItsdError, OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EvaluationError(f"--model {name}={path}: {reason}") from None
    return loaded


def clip_or_reason(path: Path | None) -> tuple[ClipScorer | None, str]:
    """The CLIP scorer and its folder, or None and why CLIP figures are skipped."""
    try:
        return load_clip(path), str(path)
    except ClipUnavailable as exc:
        return None, f"skipped: {exc}"
