"""`itsd prepare`: build an instruction-prompted (FLAN style) dataset from photos, pairs or degradations.

    itsd prepare OUT --photos DIR [--teacher-onnx M.onnx | --teacher-command "prog {input} {output}"]
    itsd prepare OUT --pairs RAINY_DIR CLEAN_DIR --task derain
    itsd prepare OUT --clean DIR --task derain=2 --task denoise=1

One source per run; the options come in bundles (source, task, crop, split, columns) defined once below.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
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
from training.teachers import BUILTIN_TEACHERS, RANGES, CommandTeacher, OnnxTeacher, Teacher, cartoon
from training.templates import load_templates, pick_template

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def bundle(*options: Decorator) -> Decorator:
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def parse_tasks(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    """`derain=2 denoise` -> {"derain": 2.0, "denoise": 1.0}."""
    tasks: dict[str, float] = {}
    for value in values:
        name, _, weight = value.partition("=")
        try:
            tasks[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise click.BadParameter(f"{value!r}: the weight after '=' must be a number") from None
        if tasks[name.strip()] <= 0:
            raise click.BadParameter(f"{value!r}: weights must be > 0")
    return tasks


def parse_ranges(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Ranges:
    """`motion_blur.length=0.01,0.03` -> {"motion_blur": {"length": (0.01, 0.03)}}, checked against the
    degradations' declared parameters."""
    ranges: Ranges = {}
    for value in values:
        key, _, bounds = value.partition("=")
        name, _, parameter = key.strip().partition(".")
        try:
            low, high = (float(bound) for bound in bounds.split(","))
        except ValueError:
            raise click.BadParameter(
                f"{value!r}: write NAME.PARAMETER=LOW,HIGH, e.g. motion_blur.length=0.01,0.03"
            ) from None
        ranges.setdefault(name, {})[parameter] = (low, high)
    try:
        check_ranges(ranges)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return ranges


def _dir(**kwargs: Any) -> click.Path:
    return click.Path(exists=True, file_okay=False, path_type=Path, **kwargs)


source_options = bundle(
    click.option("--photos", type=_dir(), help="Folder of photos; a teacher makes each target."),
    click.option(
        "--pairs",
        nargs=2,
        type=_dir(),
        metavar="INPUT_DIR TARGET_DIR",
        help="Paired folders, matched by relative path and file stem (Rain13k, SIDD, LOL, REDS).",
    ),
    click.option("--clean", type=_dir(), help="Folder of clean photos to degrade synthetically (seeded)."),
    click.option(
        "--teacher-onnx",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Teacher for --photos: an ONNX image-to-image model (NCHW float), run on CPU.",
    ),
    click.option(
        "--onnx-range",
        type=click.Choice(sorted(RANGES)),
        default="unit",
        show_default=True,
        help="Value range of the ONNX teacher's input and output: unit [0, 1] or signed [-1, 1].",
    ),
    click.option(
        "--teacher-command",
        metavar="TEMPLATE",
        help='Teacher for --photos: a shell command, e.g. "prog {input} {output}" (PNG files).',
    ),
    click.option(
        "--pair-strip",
        multiple=True,
        metavar="TEXT",
        help="Text removed from file stems before matching pairs, e.g. NOISY_ and GT_ (repeatable).",
    ),
)


def untouched_option(default: float = 0.0) -> Decorator:
    """`--untouched`, for `itsd prepare` (default 0) and the itsd-tiny recipe (its own default)."""
    return click.option(
        "--untouched",
        type=click.FloatRange(0, 1, max_open=True),
        default=default,
        show_default=True,
        help="With --clean: share of restoration rows with nothing of their task to undo (the input is the clean "
        "crop or has another task's damage; the target is the input), so the instruction, not the photo alone, "
        "says what to do.",
    )


task_options = bundle(
    click.option(
        "--task",
        "tasks",
        multiple=True,
        callback=parse_tasks,
        metavar="NAME[=WEIGHT]",
        help="Task of the rows; repeat with weights for a synthetic mixture (derain=2). "
        "Default: cartoonization for --photos, every degradation task for --clean (which can also mix in "
        "cartoonization, made by the built-in cartoon teacher).",
    ),
    click.option(
        "--paraphrases",
        type=click.Choice(["fixed", "all"]),
        default="fixed",
        show_default=True,
        help=f"fixed: one paraphrase per row, drawn with the seed; all: also store every paraphrase "
        f"in '{CHOICES_COLUMN}' so the trainer samples one per step.",
    ),
    click.option("--templates-dir", type=_dir(), help="Folder of <task>.txt templates replacing the shipped ones."),
    untouched_option(),
    click.option(
        "--degradation-range",
        "ranges",
        multiple=True,
        callback=parse_ranges,
        metavar="NAME.PARAMETER=LOW,HIGH",
        help="With --clean: draw a degradation's parameter from this range instead of the declared one (repeatable), "
        "e.g. milder blur: motion_blur.length=0.01,0.03 (sizes are fractions of the crop's short side; blur has a "
        "floor of 5 px motion and 2 px defocus radius).",
    ),
)
crop_options = bundle(
    click.option(
        "--resolution", type=click.IntRange(16, 4096), default=256, show_default=True, help="Side of the square crops."
    ),
    click.option(
        "--crop",
        "crop_mode",
        type=click.Choice(["random", "center", "none"]),
        default="random",
        show_default=True,
        help="Crop box (the same for input and target); none: resize only.",
    ),
    click.option(
        "--resize/--no-resize",
        default=True,
        show_default=True,
        help="Resize the short side to --resolution before cropping (aspect kept); --no-resize crops at native scale.",
    ),
    click.option(
        "--samples-per-image",
        type=click.IntRange(1, 1000),
        default=1,
        show_default=True,
        help="Crops (and degradations) drawn from each photo or pair.",
    ),
    click.option(
        "--seed",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Seed for crops, degradations, instruction choice and splits.",
    ),
)
split_options = bundle(
    click.option(
        "--validation-fraction",
        type=click.FloatRange(0, 1),
        default=0.05,
        show_default=True,
        help="Share of photos in the validation split (by hash of the photo's name and the seed).",
    ),
    click.option(
        "--test-fraction",
        type=click.FloatRange(0, 1),
        default=0.05,
        show_default=True,
        help="Share of photos in the test split.",
    ),
)
column_name_options = bundle(  # also `itsd evaluate`'s, so both name columns the same way
    click.option("--original-image-column", help="Name of the input image column. [default: the schema's]"),
    click.option("--edit-prompt-column", help="Name of the instruction column. [default: the schema's]"),
    click.option("--edited-image-column", help="Name of the target image column. [default: the schema's]"),
)
column_options = bundle(
    click.option(
        "--schema",
        "schema_name",
        type=click.Choice(sorted(SCHEMAS)),
        help="Column names of the blog's public datasets. Default: cartoonization for that task only.",
    ),
    column_name_options,
    click.option(
        "--format",
        "fmt",
        type=click.Choice(["arrow", "parquet"]),
        default="arrow",
        show_default=True,
        help="arrow: datasets save_to_disk (load_from_disk); parquet: data/<split>-*.parquet (load_dataset).",
    ),
)


def build_source(
    photos: Path | None,
    pairs: tuple[Path, Path] | None,
    clean: Path | None,
    tasks: dict[str, float],
    teacher_onnx: Path | None,
    onnx_range: str,
    teacher_command: str | None,
    pair_strip: tuple[str, ...],
    untouched: float = 0.0,
    ranges: Ranges | None = None,
) -> Source:
    if sum(x is not None and x != () for x in (photos, pairs, clean)) != 1:
        raise click.UsageError("give exactly one source: --photos, --pairs or --clean")
    if (teacher_onnx or teacher_command) and not photos:
        raise click.UsageError("--teacher-onnx and --teacher-command go with --photos")
    if untouched and not clean:
        raise click.UsageError("--untouched goes with --clean")
    if ranges and not clean:
        raise click.UsageError("--degradation-range goes with --clean")
    if clean:
        tasks = tasks or dict.fromkeys(TASK_DEGRADATIONS, 1.0)
        known = [*TASK_DEGRADATIONS, *BUILTIN_TEACHERS]
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            raise click.UsageError(
                f"no degradation or teacher for task(s) {', '.join(unknown)}; choose from {', '.join(known)}"
            )
        return SyntheticSource(clean, tasks, BUILTIN_TEACHERS, untouched, ranges)
    if len(tasks) > 1:
        raise click.UsageError("a mixture of tasks needs --clean; --photos and --pairs take one --task")
    if pairs:
        if not tasks:
            raise click.UsageError("--pairs needs --task (e.g. derain, denoise, low_light, deblur)")
        return PairSource(pairs[0], pairs[1], next(iter(tasks)), pair_strip)
    if teacher_onnx and teacher_command:
        raise click.UsageError("give one teacher: --teacher-onnx or --teacher-command")
    teacher: Teacher = (
        OnnxTeacher(teacher_onnx, onnx_range)
        if teacher_onnx
        else CommandTeacher(teacher_command)
        if teacher_command
        else cartoon
    )
    return PhotoSource(photos, teacher, next(iter(tasks), "cartoonization"))


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@source_options
@task_options
@crop_options
@split_options
@column_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def prepare(out: Path, **options: Any) -> None:
    """Build an instruction-prompted dataset at OUT from photos + teacher, paired folders, or degradations.

    Writes a datasets DatasetDict (train/validation/test) in the blog's public schema, plus summary.json.
    """
    try:
        run(out, **options)
    except (InvalidParameters, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def run(
    out: Path,
    *,
    photos: Path | None,
    pairs: tuple[Path, Path] | None,
    clean: Path | None,
    teacher_onnx: Path | None,
    onnx_range: str,
    teacher_command: str | None,
    pair_strip: tuple[str, ...],
    tasks: dict[str, float],
    paraphrases: str,
    templates_dir: Path | None,
    untouched: float,
    ranges: Ranges,
    resolution: int,
    crop_mode: str,
    resize: bool,
    samples_per_image: int,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    schema_name: str | None,
    original_image_column: str | None,
    edit_prompt_column: str | None,
    edited_image_column: str | None,
    fmt: str,
    overwrite: bool,
    quiet: bool,
) -> dict[str, Any]:
    if validation_fraction + test_fraction > 1:
        raise click.UsageError("--validation-fraction plus --test-fraction must be at most 1")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise click.ClickException(f"{out} exists and is not empty (use --overwrite to replace it)")
        if not (out / "summary.json").is_file():  # never delete a folder this command did not write
            raise click.ClickException(f"{out} is not a dataset made by itsd prepare; refusing to replace it")
    source = build_source(
        photos, pairs, clean, tasks, teacher_onnx, onnx_range, teacher_command, pair_strip, untouched, ranges
    )
    folder = photos or clean or (pairs[0] if pairs else None)
    if not source.units:
        raise click.ClickException(f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    templates = {task: load_templates(task, templates_dir) for task in source.tasks}
    base = SCHEMAS[schema_name or schema_for(list(source.tasks))]
    schema = base.override(original_image_column, edit_prompt_column, edited_image_column)
    fractions = {
        "train": 1.0 - validation_fraction - test_fraction,
        "validation": validation_fraction,
        "test": test_fraction,
    }
    crop = Crop(resolution, crop_mode, resize)

    skipped, tally = [], Counter()
    with DatasetWriter(out, features(schema, paraphrases == "all"), list(fractions), fmt) as writer:
        for unit in tqdm(source.units, desc="prepare", unit="image", disable=quiet):
            split = split_of(unit.key, seed, fractions)
            made = produce(source, unit, crop, seed, samples_per_image)
            if isinstance(made, str):
                skipped.append({"unit": unit.key, "reason": made})
                click.echo(f"skipped {made}", err=True)
                continue
            for example in made:
                row = {
                    schema.input_column: png(example.input),
                    schema.instruction_column: pick_template(templates[example.task], seed, example.key),
                    schema.target_column: png(example.target),
                    TASK_COLUMN: example.task,
                    SOURCE_COLUMN: unit.key,
                } | ({CHOICES_COLUMN: templates[example.task]} if paraphrases == "all" else {})
                writer.write(split, row)
                tally[split, example.task] += 1
    summary = {
        "output": str(out),
        "format": fmt,
        "columns": list(writer.features),
        "seed": seed,
        "degradation_ranges": ranges,
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
    echo_summary(summary)
    return summary


def echo_summary(summary: dict[str, Any]) -> None:
    rows = ", ".join(f"{split} {n}" for split, n in summary["rows"].items())
    click.echo(f"wrote {sum(summary['rows'].values())} rows to {summary['output']} ({rows})")
    click.echo("tasks: " + ", ".join(f"{task} {n}" for task, n in summary["tasks"].items()))
    unmatched = summary["unmatched"]
    if unmatched["inputs"] or unmatched["targets"]:
        click.echo(
            f"unmatched: {len(unmatched['inputs'])} inputs without a target, "
            f"{len(unmatched['targets'])} targets without an input"
        )
    click.echo(f"skipped: {summary['skipped']} unreadable or failed files")
