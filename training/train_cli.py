"""`itsd train`: fine-tune InstructPix2Pix from a TOML config, with CLI overrides.

Multi-GPU: `accelerate launch --multi_gpu $(which itsd) train --config run.toml`; every process runs the
same command, and each draws its own batches (the per-device batch is `train_batch_size`).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file of TrainConfig keys (see training/configs/example.toml).",
)
@click.option("--pretrained", help="Diffusers checkpoint folder: InstructPix2Pix, or Stable Diffusion (widened).")
@click.option(
    "--dataset", help="Dataset folder: `datasets.save_to_disk`, or parquet under data/ (both `itsd prepare` formats)."
)
@click.option("--output-dir", help="Where checkpoints, validation grids, TensorBoard logs and final/ go.")
@click.option("--max-train-steps", type=click.IntRange(min=1), help="Optimizer steps to train for.")
@click.option("--resume", help="Continue from 'latest' (newest checkpoint in the output dir) or a checkpoint folder.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set any config key (repeatable), e.g. --set learning_rate=1e-4 --set use_ema=false.",
)
@click.option("--print-config", is_flag=True, help="Print the resolved config as TOML and exit.")
def train(
    config_path: Path | None,
    pretrained: str | None,
    dataset: str | None,
    output_dir: str | None,
    max_train_steps: int | None,
    resume: str | None,
    overrides: tuple[str, ...],
    print_config: bool,
) -> None:
    """Fine-tune InstructPix2Pix on a prepared dataset; writes OUTPUT_DIR/final for `itsd export`.

    Precedence: defaults < --config file < --set < the dedicated flags. Unknown keys are errors.
    """
    from training.config import load_config, to_toml

    flags = {
        "pretrained": pretrained,
        "dataset": dataset,
        "output_dir": output_dir,
        "max_train_steps": max_train_steps,
        "resume": resume,
    }
    config = load_config(config_path, overrides, flags)
    if print_config:
        click.echo(to_toml(config), nl=False)
        return
    from training.train import train as run_training

    run_training(config)
    click.echo(f"final checkpoint: {Path(config.output_dir) / 'final'}")
