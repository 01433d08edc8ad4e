"""The `itsd` root group. Subcommands live with the part that owns them and load on first use, so
`itsd --help` is fast and a worker install that has no torch still runs `itsd worker`."""

from __future__ import annotations

import importlib
import logging
from typing import NamedTuple

import click


class Entry(NamedTuple):
    target: str  # "module:attribute" of the click command
    extra: str  # the install extra that provides its dependencies
    help: str  # one line, shown by `itsd --help` without importing the command


COMMANDS: dict[str, Entry] = {
    "export": Entry("export.cli:export", "export", "Export a diffusers IP2P checkpoint to verified ONNX artifacts."),
    "edit": Entry("worker.cli:edit", "worker", "Edit images in this process, no queue (ONNX, or a torch baseline)."),
    "prepare": Entry(
        "training.prepare_cli:prepare",
        "train",
        "Build an instruction-prompted dataset from photos, pairs or degradations.",
    ),
    "train": Entry(
        "training.train_cli:train",
        "train",
        "Fine-tune InstructPix2Pix (from IP2P, or SD with a widened conv_in).",
    ),
    "evaluate": Entry(
        "training.evaluate_cli:evaluate",
        "train",
        "Measure models on a test split: PSNR/SSIM vs. the identity baseline, grids.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        entry = COMMANDS[cmd_name]
        module_name, attribute = entry.target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.ClickException(
                f"`itsd {cmd_name}` needs packages this install lacks ({exc.name}): pip install 'itsd[{entry.extra}]'"
            ) from None
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name].help) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="itsd")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def itsd(verbose: int) -> None:
    """itsd: instruction-driven image editing (InstructPix2Pix) in bulk, on ONNX Runtime workers."""
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    itsd(prog_name="itsd")


if __name__ == "__main__":  # `python -m producer.cli`, e.g. under `accelerate launch -m`
    main()
