"""`itsd export SRC OUT`."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

DEFAULT_LORA_SCALE = 1.0


def parse_loras(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[Path, float]]:
    """Each `FILE[=SCALE]` as (file, scale), SCALE a finite number (default 1); the export checks the files."""
    loras = []
    for value in values:
        name, equals, scale_text = value.rpartition("=")
        if not equals or Path(value).is_file():  # a file whose name holds "=" needs no scale
            name, scale_text = value, str(DEFAULT_LORA_SCALE)
        path = Path(name).expanduser()
        try:
            scale = float(scale_text)
        except ValueError:
            raise click.BadParameter(f"{value}: SCALE {scale_text!r} is not a number", ctx, param) from None
        if not math.isfinite(scale):
            raise click.BadParameter(f"{value}: SCALE must be a finite number", ctx, param)
        loras.append((path, scale))
    return loras


@click.command()
@click.argument("source", metavar="SRC")
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Weights of the UNet; fp16 is for GPUs (the text encoder and VAE stay fp32).",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Compare with the diffusers pipeline on a probe image and refuse an export that differs.",
)
@click.option(
    "--lora",
    "loras",
    metavar="FILE[=SCALE]",
    multiple=True,
    callback=parse_loras,
    help="Fuse this LoRA (.safetensors, diffusers/PEFT or kohya format) into the UNet and text encoder at SCALE "
    "(default 1) before exporting; repeatable, fused in order. Part of the model's identity.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds something.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
def export(
    source: str, out: Path, dtype: str, verify: bool, loras: list[tuple[Path, float]], overwrite: bool, quiet: bool
) -> None:
    """Export the InstructPix2Pix checkpoint SRC (a diffusers folder, or a Hub id when online) to ONNX
    artifacts in OUT: one graph per component, tokenizer, scheduler config and manifest.json."""
    from export.exporter import export_checkpoint  # torch: a missing extra is explained by the root group

    start = time.perf_counter()
    manifest = export_checkpoint(
        source,
        out,
        dtype=dtype,
        verify_parity=verify,
        overwrite=overwrite,
        report=(lambda _: None) if quiet else (lambda line: click.echo(f"  {line}", err=True)),
        loras=loras,
    )
    parity = manifest.parity
    checked = f"parity {parity.psnr_db:.1f} dB, max diff {parity.max_abs_diff:.0f}/255" if parity else "not verified"
    facts = ", ".join(filter(None, (dtype, manifest.lora_summary, checked, f"model {manifest.model_id}")))
    click.echo(f"exported {source} -> {out} ({facts}) in {time.perf_counter() - start:.1f} s")
