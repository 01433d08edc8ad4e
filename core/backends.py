"""Where each edit backend lives, loaded by name so no part imports another's heavy dependencies.

`onnx` is what workers serve (ONNX Runtime, no torch); `torch` is diffusers' own pipeline, the baseline.
Both implement `core.edit.Backend` and have a `load(model: str)` classmethod.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from core.edit import Backend
from core.errors import InvalidModel
from core.manifest import MANIFEST_NAME

# name -> ("module:Class", the install extra that provides it)
BACKENDS = {
    "onnx": ("worker.pipeline:OnnxEditPipeline", "worker"),
    "torch": ("export.reference:TorchEditPipeline", "export"),
}


def detect(model: str) -> str:
    """`onnx` for an artifact folder, `torch` for a diffusers checkpoint folder or a Hub id."""
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        return "onnx"
    if (path / "model_index.json").is_file() or (not path.exists() and model.count("/") == 1):
        return "torch"
    raise InvalidModel(f"{model}: neither an itsd artifact folder (manifest.json) nor a diffusers checkpoint")


def load_backend(model: str, backend: str | None = None) -> Backend:
    name = backend or detect(model)
    target, extra = BACKENDS[name]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidModel(f"the {name} backend needs {exc.name}: pip install 'itsd[{extra}]'") from None
    return getattr(module, class_name).load(model)
