"""The `itsd` root group. Subcommands live with the part that owns them and load on first use, so
`itsd --help` is fast and a worker install that has no torch still runs `itsd edit`. A command that
needs a package its install lacks (at import or when it runs) says which extra to install."""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, NamedTuple

import click

from core.errors import ItsdError


class Entry(NamedTuple):
    target: str  # "module:attribute" of the click command
    extra: str  # the install extra that provides its dependencies
    help: str  # one line, shown by `itsd --help` without importing the command


COMMANDS: dict[str, Entry] = {
    "export": Entry("export.cli:export", "export", "Export a diffusers IP2P checkpoint to verified ONNX artifacts."),
    "edit": Entry(
        "worker.edit_command:edit", "worker", "Edit images in this process, no queue (ONNX, or a torch baseline)."
    ),
    "worker": Entry(
        "worker.worker_command:worker", "worker", "Serve exported models from their queues (a Celery worker)."
    ),
    "submit": Entry("producer.submit:submit", "producer", "Queue a batch of edits; --wait shows progress."),
    "status": Entry("producer.views:status", "producer", "Counts, failures and throughput of a batch; --watch: live."),
    "workers": Entry("producer.views:workers", "producer", "Which workers serve which models, on what."),
    "collect": Entry("producer.submit:collect", "producer", "Write a batch's inline results to files."),
    "cancel": Entry("producer.submit:cancel", "producer", "Cancel a batch: its queued jobs never run."),
    "metrics": Entry("producer.metrics:metrics", "producer", "Serve the queue's depth and progress for Prometheus."),
    "run": Entry("producer.run:run", "worker", "Everything on one machine: private Redis, local workers, a batch."),
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


OWN_PACKAGES = frozenset({"core", "worker", "producer", "export", "training"})  # a missing one is a bug, not an extra


def _missing_extra(cmd_name: str, exc: ImportError) -> click.ClickException:
    return click.ClickException(
        f"`itsd {cmd_name}` needs {exc.name}, which this install lacks: pip install 'itsd[{COMMANDS[cmd_name].extra}]'"
    )


def _explain_errors(cmd_name: str, command: click.Command) -> click.Command:
    """Wrap the command's callback: the one error handler of every command. An ItsdError (what went wrong, and
    what to do) becomes its one line and exit status 1; a third-party module missing at run time, the hint
    naming the extra to install. Library code raises ItsdError and never imports click for it."""
    callback = command.callback
    if callback is None:
        return command

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ItsdError as exc:
            raise click.ClickException(str(exc)) from None
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] in OWN_PACKAGES:
                raise
            raise _missing_extra(cmd_name, exc) from None

    command.callback = run
    return command


@functools.cache
def _load(cmd_name: str) -> click.Command:
    module_name, attribute = COMMANDS[cmd_name].target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _missing_extra(cmd_name, exc) from None
    return _explain_errors(cmd_name, getattr(module, attribute))


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return _load(cmd_name) if cmd_name in COMMANDS else None

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
    logging.getLogger("transformers.utils.import_utils").addFilter(without_torchvision_notice)


def without_torchvision_notice(record: logging.LogRecord) -> bool:
    """itsd installs no torchvision on purpose (README); transformers' notice that it falls back to its PIL image
    processors, printed by every command that imports diffusers, is dropped."""
    return "requires torchvision (not installed)" not in record.getMessage()


def main() -> None:
    itsd(prog_name="itsd")


if __name__ == "__main__":  # `python -m producer.cli`, e.g. under `accelerate launch -m`
    main()
