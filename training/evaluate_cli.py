"""`itsd evaluate`: the command over `training.evaluate.evaluate_models` (models on a test split, with grids).

itsd evaluate data/cartoon --model ft=artifacts/ft --model base=checkpoints/ip2p --out eval/
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from core.backends import BACKENDS
from core.params import EditParams
from producer.options import edit_options_seeded, runtime_options
from training.dataset import Schema
from training.evaluate import EVAL_SEED, EvaluationSpec, evaluate_models
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
@edit_options_seeded(f"{EVAL_SEED}, so runs are reproducible")
@runtime_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def evaluate(
    dataset: Path,
    models: dict[str, str],
    out: Path,
    params: EditParams,
    original_image_column: str | None,
    edit_prompt_column: str | None,
    edited_image_column: str | None,
    quiet: bool,
    **options: Any,
) -> None:
    """Measure models on a DATASET split (either format of `itsd prepare`): PSNR and SSIM against the target per
    task, beside the untouched input's figures (the identity baseline), optional CLIP similarities,
    and comparison grids (input | models... | target). An artifact folder runs on --runtime and --precision, chosen
    as a worker chooses them; the report names what ran each model.

    Writes OUT/metrics.json, OUT/metrics.md and OUT/grids/<task>.png; prints the table.
    """
    columns = Schema(original_image_column or "", edit_prompt_column or "", edited_image_column or "")
    spec = EvaluationSpec(dataset, models, params, columns=columns, **options)
    report = evaluate_models(spec, out, progress=not quiet, report=functools.partial(click.echo, err=True))
    click.echo((out / "metrics.md").read_text(), nl=False)
    click.echo("ran: " + "; ".join(f"{name} on {model['runtime']}" for name, model in report["models"].items()))
    grids = len(report["tasks"]) if spec.grid_rows else 0  # one per task
    click.echo(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and {grids} grid(s) in {out / 'grids'}")
