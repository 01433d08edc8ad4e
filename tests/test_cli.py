"""The command line: every command has help, and the worker side never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer.cli import COMMANDS, OWN_PACKAGES, itsd


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    result = CliRunner().invoke(itsd, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


HEAVY = ("torch", "diffusers", "onnxruntime", "export", "worker", "training")


def test_the_root_help_lists_commands_without_importing_them():
    code = (
        "import sys, json\n"
        "from producer.cli import main\n"
        "sys.argv = ['itsd', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
    assert all(name in out for name in COMMANDS)


def test_the_worker_pipeline_and_edit_command_load_without_torch_or_diffusers():
    code = (
        "import sys, json, worker.pipeline, worker.edit_command, core.schedulers, worker.tokenizer, worker.providers; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_the_contract_in_core_imports_no_click():
    """core is what every part shares; command-line options live with the commands (producer.options)."""
    code = (
        "import sys, json, pkgutil, importlib, core\n"
        "for m in pkgutil.iter_modules(core.__path__):\n    importlib.import_module('core.' + m.name)\n"
        "print(json.dumps('click' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is False


def test_the_generated_reference_pages_are_what_the_code_says():
    """docs/cli.md (every command's --help) and docs/modules.md (every module's docstring) are never stale."""
    script = Path(__file__).parents[1] / "scripts" / "reference_docs.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_name_the_benchmarks_import_from_itsd_exists():
    """bench/ is not run by the suite; a rename must not leave a benchmark that fails at its first line."""
    import ast
    import importlib

    own = {"core", "worker", "producer", "export", "training"}
    missing = []
    for script in sorted((Path(__file__).parents[1] / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in own:
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    assert missing == []


def test_an_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(itsd, ["frobnicate"])
    assert result.exit_code == 2 and "No such command" in result.output


@pytest.mark.parametrize(("command", "extra"), [("export", "export"), ("train", "train")])
def test_a_command_without_torch_installed_says_which_extra_to_install(tmp_path, command, extra):
    args = {
        "export": [str(tmp_path), str(tmp_path / "out")],
        "train": ["--pretrained", str(tmp_path), "--dataset", str(tmp_path), "--output-dir", str(tmp_path / "o")],
    }
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as on a worker install: importing torch fails\n"
        "from producer.cli import main\n"
        f"sys.argv = ['itsd', {command!r}, *{args[command]!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    expected = f"Error: `itsd {command}` needs torch, which this install lacks: pip install 'itsd[{extra}]'"
    assert result.stderr.strip().splitlines() == [expected]


@pytest.mark.parametrize(
    ("command", "envvar"),
    [
        (["status", "abc"], "ITSD_BROKER_URL"),
        (["worker", "-m", "a=x"], "ITSD_BROKER_URL"),
        (["run", "x", "-o", "y"], "ITSD_RUN_BROKER_URL"),
    ],
)
def test_a_broker_password_on_the_command_line_is_refused_and_the_env_is_named(command, envvar):
    result = CliRunner().invoke(itsd, [*command, "--broker", "redis://:hunter2@127.0.0.1:1/0"])
    assert result.exit_code == 2 and f"put the URL in {envvar} instead" in result.output
    assert "hunter2" not in result.output


def test_a_device_is_auto_cpu_or_cuda_n_and_anything_else_names_the_option():
    from core.errors import InvalidParameters
    from worker.serving import parse_device

    assert parse_device("auto") == (None, 0)
    assert parse_device("cpu") == (("CPUExecutionProvider",), 0)
    assert parse_device("cuda:1")[1] == 1 and parse_device("cuda")[1] == 0
    with pytest.raises(InvalidParameters, match="--device 'gpu': use auto, cpu or cuda:N"):
        parse_device("gpu")


def test_a_short_flag_means_the_same_option_in_every_command():
    from collections import defaultdict

    from producer.cli import _load

    meanings = defaultdict(set)
    for name in COMMANDS:
        for param in _load(name).params:
            names = param.opts + param.secondary_opts
            long = next((n for n in names if n.startswith("--")), None)
            for short in (n for n in names if n.startswith("-") and not n.startswith("--")):
                meanings[short].add(long)
    assert {short: longs for short, longs in meanings.items() if len(longs) > 1} == {}


def test_itsd_edit_and_itsd_run_take_the_same_model_by_default_with_the_same_help():
    from producer.cli import _load

    edit, run = ({p.name: p for p in _load(name).params}["model"] for name in ("edit", "run"))
    assert (edit.default, edit.help, edit.required) == (run.default, run.help, False)
    assert "exported on first use" in edit.help


def test_the_export_dtype_help_says_the_text_encoder_and_vae_stay_fp32():
    from core.manifest import COMPONENTS

    help_text = " ".join(CliRunner().invoke(itsd, ["export", "--help"]).output.split())
    kept = {spec.module for spec in COMPONENTS.values() if spec.always_fp32}
    assert kept == {"text_encoder", "vae"} and "the text encoder and VAE stay fp32" in help_text


def test_evaluate_s_seed_help_gives_the_seed_it_uses_and_edit_s_says_random():
    from training.evaluate import EVAL_SEED

    evaluate, edit = (" ".join(CliRunner().invoke(itsd, [c, "--help"]).output.split()) for c in ("evaluate", "edit"))
    assert f"[default: {EVAL_SEED}, so runs are reproducible]" in evaluate and "[default: random]" not in evaluate
    assert "[default: random]" in edit


def test_a_missing_instruction_says_it_is_missing_and_how_to_give_it_and_a_blank_one_that_it_is_empty(tmp_path):
    from tests.conftest import photo

    photo().save(tmp_path / "a.png")
    for given, said in (((), 'no instruction: give one with --instruction "TEXT"'), (("-i", " "), "is empty")):
        result = CliRunner().invoke(itsd, ["run", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *given])
        assert result.exit_code == 2 and said in result.output, result.output


def test_the_wheel_carries_the_bundled_model_that_model_defaults_to(tmp_path):
    """A wheel install has no repository: `--model`'s default must be package data, every file of it."""
    import shutil
    import zipfile

    from producer.models import BUNDLED_MODEL

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "models", *OWN_PACKAGES):
        copy = shutil.copytree if (repo / name).is_dir() else shutil.copy
        copy(repo / name, source / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", str(tmp_path)],
        cwd=source, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("itsd-*.whl")
    inside = BUNDLED_MODEL.relative_to(repo).as_posix()
    with zipfile.ZipFile(wheel) as archive:
        shipped = {i.filename.removeprefix(inside + "/"): i.file_size for i in archive.infolist()}
    model = repo / "models" / "itsd-tiny"
    files = {f.relative_to(model).as_posix(): f.stat().st_size for f in model.rglob("*") if f.is_file()}
    assert BUNDLED_MODEL.resolve() == model.resolve() and "unet/diffusion_pytorch_model.safetensors" in files
    assert {name: shipped.get(name) for name in files} == files


def test_itsd_run_on_a_folder_without_images_says_so_and_starts_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(itsd, ["run", str(tmp_path / "empty"), "-i", "x", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no images found in" in result.output, result.output
