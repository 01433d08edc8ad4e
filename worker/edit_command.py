"""`itsd edit`: edit images in this process with ONNX artifacts (or the torch baseline), no queue."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from core.backends import BACKENDS, detect, load_backend
from core.edit import Backend, Tiling, edit_image
from core.errors import ItsdError
from core.images import encode_image, read_image_file
from core.inputs import check_destination, expand
from core.params import EditParams
from core.settings import Settings
from core.storage import write_atomic
from producer.options import edit_options, runtime_options, tile_batch_option


class TileProgress:
    """A second bar, under the images bar, for one image's model calls on tiles (tiles x steps), shown only
    for an image of more than a few calls and removed when it is done."""

    def __init__(self, name: str, disable: bool) -> None:
        self.name, self.disable, self.bar = name, disable, None

    def update(self, done: int, total: int) -> None:
        if self.bar is None and not self.disable and total > 8:
            self.bar = tqdm(total=total, desc=self.name, unit="call", leave=False, file=sys.stderr, dynamic_ncols=True)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def __enter__(self) -> TileProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def load(model: str, backend: str, runtime: str, precision: str) -> Backend:
    """The artifacts on their runtime (onnx), or the checkpoint's torch modules (torch)."""
    if backend == "onnx" and detect(model) == "onnx":
        from worker.runtimes import load_artifacts

        return load_artifacts(Path(model), runtime, precision)
    return load_backend(model, backend)


@click.command()
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True)
@click.option(
    "--model",
    "-m",
    required=True,
    metavar="PATH",
    help="Artifact folder from `itsd export` (onnx), or a diffusers checkpoint (torch).",
)
@click.option("--instruction", "-i", required=True, help='What to do, e.g. "Cartoonize the image".')
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the edited images; each keeps its input's name and size.",
)
@edit_options
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default="onnx",
    show_default=True,
    help="onnx: the artifacts a worker runs; torch: the checkpoint's own torch modules in the same loop, a baseline.",
)
@runtime_options
@tile_batch_option
@click.option("--skip-existing", is_flag=True, help="Leave images whose output exists alone (resume a run).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def edit(
    images: tuple[str, ...],
    model: str,
    instruction: str,
    out: Path,
    params: EditParams,
    backend: str,
    runtime: str,
    precision: str,
    tile_batch: int,
    skip_existing: bool,
    quiet: bool,
) -> None:
    """Edit IMAGE... (files, folders, globs) by INSTRUCTION. A bad image is reported and skipped;
    the exit status is 1 if any image failed. A symlink is followed; what it names must lie under the folder
    it was found in (a folder given, or a named file's own), else it is refused alone."""
    if not instruction.strip():
        raise click.BadParameter("the instruction is empty", param_hint="--instruction")
    settings = Settings.from_env()
    inputs, refused = expand(list(images))
    for bad in refused:  # a symlink out of its folder: refused alone, as `itsd run` refuses it
        click.echo(f"failed: {bad.message}", err=True)
    if not inputs and not refused:
        raise click.ClickException(f"no images found in {' '.join(images)}")
    check_destination(inputs, out)
    skipped = [item for item in inputs if skip_existing and (out / item.relative).exists()]
    inputs = [item for item in inputs if item not in skipped]
    pipeline = load(model, backend, runtime, precision) if inputs else None
    failures, start = len(refused), time.perf_counter()
    progress = tqdm(inputs, unit="img", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    for item in progress:
        try:
            image = read_image_file(item.path, settings.max_pixels, settings.max_input_bytes)
            with TileProgress(item.relative.name, disable=quiet) as tiles:
                result = edit_image(pipeline, image, instruction, params, Tiling(batch=tile_batch), tiles.update)
            write_atomic(
                out / item.relative, encode_image(result.image, item.relative.name, source=image, keep=params.metadata)
            )
        except (ItsdError, OSError) as exc:  # OSError: the output could not be written
            failures += 1
            reason = exc if isinstance(exc, ItsdError) else f"cannot write output: {exc.strerror or exc}"
            progress.write(f"failed: {item.path}: {reason}", file=sys.stderr)
    total = len(inputs) + len(refused)
    click.echo(
        f"edited {total - failures}/{total} image(s) into {out} in {time.perf_counter() - start:.1f} s"
        + (f"; {len(skipped)} already done" if skipped else "")
        + (f"; {failures} failed" if failures else "")
    )
    if failures:
        sys.exit(1)
