"""`itsd export SRC OUT`."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command()
@click.argument("source", metavar="SRC")
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Weights of the UNet and text encoder; fp16 is for GPUs (the VAE stays fp32).",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Compare with the diffusers pipeline on a probe image and refuse an export that differs.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds something.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
def export(source: str, out: Path, dtype: str, verify: bool, overwrite: bool, quiet: bool) -> None:
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
    )
    parity = manifest.parity
    checked = f"parity {parity.psnr_db:.1f} dB, max diff {parity.max_abs_diff:.0f}/255" if parity else "not verified"
    click.echo(f"exported {source} -> {out} ({dtype}, {checked}) in {time.perf_counter() - start:.1f} s")
