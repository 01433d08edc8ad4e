"""`itsd prepare`: the command over `training.prepare.build_dataset`, its options in bundles defined once.

    itsd prepare OUT --photos DIR [--teacher-onnx M.onnx | --teacher-command "prog {input} {output}"]
    itsd prepare OUT --pairs RAINY_DIR CLEAN_DIR --task derain
    itsd prepare OUT --clean DIR --task derain=2 --task denoise=1

One source per run. The bundles (source, task, crop, split, columns) are shared with `itsd evaluate` and the
itsd-tiny recipe; their defaults are `training.prepare.DEFAULTS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from training.dataset import CHOICES_COLUMN, SCHEMAS
from training.degrade import Ranges, check_ranges
from training.prepare import DEFAULTS, DatasetSpec, build_dataset
from training.teachers import RANGES

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
        default=DEFAULTS.onnx_range,
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


def untouched_option(default: float = DEFAULTS.untouched) -> Decorator:
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
        default=DEFAULTS.paraphrases,
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
        "--resolution",
        type=click.IntRange(16, 4096),
        default=DEFAULTS.resolution,
        show_default=True,
        help="Side of the square crops.",
    ),
    click.option(
        "--crop",
        "crop_mode",
        type=click.Choice(["random", "center", "none"]),
        default=DEFAULTS.crop_mode,
        show_default=True,
        help="Crop box (the same for input and target); none: resize only.",
    ),
    click.option(
        "--resize/--no-resize",
        default=DEFAULTS.resize,
        show_default=True,
        help="Resize the short side to --resolution before cropping (aspect kept); --no-resize crops at native scale.",
    ),
    click.option(
        "--samples-per-image",
        type=click.IntRange(1, 1000),
        default=DEFAULTS.samples_per_image,
        show_default=True,
        help="Crops (and degradations) drawn from each photo or pair.",
    ),
    click.option(
        "--seed",
        type=click.IntRange(0),
        default=DEFAULTS.seed,
        show_default=True,
        help="Seed for crops, degradations, instruction choice and splits.",
    ),
)
split_options = bundle(
    click.option(
        "--validation-fraction",
        type=click.FloatRange(0, 1),
        default=DEFAULTS.validation_fraction,
        show_default=True,
        help="Share of photos in the validation split (by hash of the photo's name and the seed).",
    ),
    click.option(
        "--test-fraction",
        type=click.FloatRange(0, 1),
        default=DEFAULTS.test_fraction,
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
        default=DEFAULTS.fmt,
        show_default=True,
        help="arrow: datasets save_to_disk (load_from_disk); parquet: data/<split>-*.parquet (load_dataset). "
        "itsd train and itsd evaluate read both.",
    ),
)


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@source_options
@task_options
@crop_options
@split_options
@column_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def prepare(out: Path, overwrite: bool, quiet: bool, **options: Any) -> None:
    """Build an instruction-prompted dataset at OUT from photos + teacher, paired folders, or degradations.

    Writes a datasets DatasetDict (train/validation/test) in the blog's public schema, plus summary.json.
    """
    report = functools.partial(click.echo, err=True)
    echo_summary(build_dataset(DatasetSpec(**options), out, overwrite=overwrite, progress=not quiet, report=report))


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
