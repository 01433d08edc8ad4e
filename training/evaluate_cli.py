"""`itsd evaluate`: measure models on a test split against the identity baseline, with comparison grids.

itsd evaluate data/cartoon --model ft=artifacts/ft --model base=checkpoints/ip2p --out eval/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from core.backends import BACKENDS, detect, load_backend
from core.edit import Backend
from core.errors import ItsdError
from core.params import EditParams
from producer.options import edit_options
from training.dataset import TASK_COLUMN, Schema
from training.evaluate import EvaluationError, detect_schema, load_split, write_report
from training.evaluate import evaluate as run_evaluation
from training.metrics import ClipScorer, ClipUnavailable, load_clip
from training.prepare_cli import column_name_options


def parse_models(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """`ft=out/ft base=ckpt` -> {"ft": "out/ft", "base": "ckpt"}; a bare PATH is named by its folder."""
    models: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = (name.strip(), path.strip()) if sep else (Path(value).name or value, value)
        if not name or not path:
            raise click.BadParameter(f"{value!r}: expected NAME=PATH")
        if name in models:
            raise click.BadParameter(f"the model name {name!r} is given twice")
        models[name] = path
    return models


def select_tasks(rows: Any, tasks: tuple[str, ...]) -> Any:
    """The rows whose task column names one of `tasks`; a task the split lacks is a one-line error."""
    if TASK_COLUMN not in rows.column_names:
        raise click.ClickException(f"--task needs a '{TASK_COLUMN}' column; the dataset has none")
    present = set(rows[TASK_COLUMN])
    missing = sorted(set(tasks) - present)
    if missing:
        have = ", ".join(sorted(present))
        raise click.ClickException(f"no rows of task(s) {', '.join(missing)}; the split has {have}")
    wanted = set(tasks)
    return rows.select([i for i, task in enumerate(rows[TASK_COLUMN]) if task in wanted])


def load_backends(models: dict[str, str], backend: str | None) -> dict[str, Backend]:
    loaded = {}
    for name, path in models.items():
        try:
            loaded[name] = load_backend(path, backend)
        except (ItsdError, OSError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise click.ClickException(f"--model {name}={path}: {reason}") from None
    return loaded


def clip_or_reason(path: Path | None) -> tuple[ClipScorer | None, str]:
    try:
        return load_clip(path), str(path)
    except ClipUnavailable as exc:
        return None, f"skipped: {exc}"


@click.command("evaluate")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    required=True,
    callback=parse_models,
    metavar="NAME=PATH",
    help="A model to measure: an artifact folder (onnx) or a diffusers checkpoint (torch). Repeatable.",
)
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the report."
)
@click.option("--split", default="test", show_default=True, help="Split of a DatasetDict to evaluate on.")
@click.option("--limit", type=click.IntRange(1), help="Evaluate only the first N rows.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    metavar="NAME",
    help="Evaluate only rows of this task (repeatable); with --instruction, a phrasing is checked per task.",
)
@click.option("--instruction", "-i", help="Use this instruction for every row instead of the row's own.")
@click.option(
    "--clip-model",
    type=click.Path(path_type=Path),
    help="Local folder of a transformers CLIP model for CLIP image and direction similarity (skipped without).",
)
@click.option(
    "--grid-rows", type=click.IntRange(0), default=8, show_default=True, help="Examples per task in the grids."
)
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default=None,
    help="Force a backend. [default: onnx for an artifact folder, torch for a checkpoint]",
)
@column_name_options
@edit_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate(dataset: Path, models: dict[str, str], out: Path, params: EditParams, **options: Any) -> None:
    """Measure models on a DATASET split (a save_to_disk folder): PSNR and SSIM against the target per
    task, beside the untouched input's figures (the identity baseline), optional CLIP similarities,
    and comparison grids (input | models... | target).

    Writes OUT/metrics.json, OUT/metrics.md and OUT/grids/<task>.png; prints the table. The seed
    defaults to 0 so runs are reproducible.
    """
    try:
        rows, split = load_split(dataset, options["split"])
        overrides = Schema(
            options["original_image_column"], options["edit_prompt_column"], options["edited_image_column"]
        )
        schema = detect_schema(rows.column_names, overrides)
    except EvaluationError as exc:
        raise click.ClickException(str(exc)) from None
    if options["tasks"]:
        rows = select_tasks(rows, options["tasks"])
    if options["limit"]:
        rows = rows.select(range(min(options["limit"], len(rows))))
    if len(rows) == 0:
        raise click.ClickException(f"split {split!r} of {dataset} has no rows")
    backends = load_backends(models, options["backend"])
    clip, clip_note = clip_or_reason(options["clip_model"])
    if clip is None:
        click.echo(f"CLIP similarity {clip_note}", err=True)
    report, grids = run_evaluation(
        rows,
        schema,
        backends,
        params,
        instruction=options["instruction"],
        clip=clip,
        grid_rows=options["grid_rows"],
        quiet=options["quiet"],
    )
    report = {
        "dataset": str(dataset),
        "split": split,
        "rows": len(rows),
        "columns": {
            "input": schema.input_column,
            "instruction": schema.instruction_column,
            "target": schema.target_column,
        },
        "models": {
            name: {"path": path, "backend": options["backend"] or detect(path)} for name, path in models.items()
        },
        "clip": clip_note,
    } | {key: value for key, value in report.items() if key != "models"}
    write_report(out, report, grids)
    click.echo((out / "metrics.md").read_text(), nl=False)
    click.echo(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and {len(grids)} grid(s) in {out / 'grids'}")
