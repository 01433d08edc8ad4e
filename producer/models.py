"""The `--model` that `itsd run` and `itsd edit` share: an artifact folder, or a diffusers checkpoint (a folder,
or a Hub id when online) exported on first use and cached by its content hash under ITSD_CACHE_DIR. Without
`--model`, the bundled itsd-tiny checkpoint, which ships inside the package (`producer/bundled/`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core.backends import detect
from core.errors import InvalidModel
from core.manifest import MANIFEST_NAME, checkpoint_hash
from core.settings import Settings

BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "itsd-tiny"  # models/itsd-tiny in a checkout


def artifacts_for(model: str, settings: Settings, report: Callable[[str], None]) -> Path:
    """An artifact folder for MODEL: itself, or its cached export (made now if missing). The exporter (torch) is
    imported only to export: a cached export is found without it, in a fraction of a second."""
    if detect(model) == "onnx":
        return Path(model)
    from export.checkpoint import resolve  # imports only core; a Hub id needs huggingface_hub

    try:
        folder = resolve(model)
    except ImportError as exc:
        raise needs_export_extra(model, exc) from None
    cached = settings.cache_dir / "exports" / f"{checkpoint_hash(folder)[:16]}-fp32"
    if (cached / MANIFEST_NAME).is_file():
        report(f"using the cached export of {model}: {cached}")
        return cached
    try:
        from export.exporter import export_checkpoint
    except ImportError as exc:
        raise needs_export_extra(model, exc) from None
    report(f"exporting {model} to {cached} (once; later runs reuse it)")
    export_checkpoint(model, cached, report=report)
    return cached


def needs_export_extra(model: str, exc: ImportError) -> InvalidModel:
    return InvalidModel(f"{model} is a checkpoint; exporting it needs {exc.name}: pip install 'itsd[export]'")
