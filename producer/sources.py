"""What a batch is made of: one `BatchInput` (an image, its instruction, parameters and output key) per image,
from files, folders, globs, URLs or manifests.

A manifest is a `.csv` or `.jsonl` file whose rows name an `input` (a path relative to the manifest, or
a URL) and may set `instruction`, `output` (the key under the destination) and any edit parameter
(`steps`, `guidance_scale`, `image_guidance_scale`, `seed`, `scheduler`, `max_side`, `detail`,
`guidance_until`), overriding the command line's for that row. A row that is wrong fails alone, with its line number.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from core.errors import InputNotFound, InvalidParameters, ItsdError
from core.inputs import IMAGE_SUFFIXES, expand, safe_relative
from core.params import EditParams
from core.storage import remote_fs

MANIFEST_SUFFIXES = (".csv", ".jsonl")
# How a manifest cell (CSV gives text) becomes each EditParams field.
PARAM_PARSERS = {
    "steps": int,
    "guidance_scale": float,
    "image_guidance_scale": float,
    "seed": int,
    "scheduler": str,
    "max_side": int,
    "detail": float,
    "guidance_until": float,
}


@dataclass(frozen=True)
class BatchInput:
    uri: str  # local path or URL
    relative: PurePosixPath  # the output key under the destination
    instruction: str
    params: EditParams


@dataclass(frozen=True)
class Rejected:
    where: str  # the input or manifest line
    error: ItsdError


def _is_url(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


def _remote_files(pattern: str) -> list[tuple[str, PurePosixPath]]:
    """Files under a URL (a file, a folder, or a glob), named below the part without wildcards."""
    fs, path = remote_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    if glob.has_magic(path):
        root = path[: path.find(next(c for c in path if c in "*?["))].rsplit("/", 1)[0]
        found = sorted(fs.glob(path))
    elif fs.isdir(path):
        root, found = path.rstrip("/"), sorted(fs.find(path))
    else:
        root, found = path.rsplit("/", 1)[0], [path]
    files = [p for p in found if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputNotFound(f"{pattern}: matches no image files")
    return [(f"{protocol}://{p}", safe_relative(p[len(root) :].lstrip("/"))) for p in files]


def _row_params(row: dict[str, Any], params: EditParams) -> EditParams:
    overrides = {}
    for name, parse in PARAM_PARSERS.items():
        value = row.get(name)
        if value in (None, ""):
            continue
        try:
            overrides[name] = parse(value)
        except (TypeError, ValueError):
            raise InvalidParameters(f"{name}: {value!r} is not a valid {parse.__name__}") from None
    return EditParams.from_dict({**params.to_dict(), **overrides})


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | InvalidParameters]]:
    """Each row with its line number; a JSONL line that is no JSON object comes as its error, to fail alone."""
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix == ".csv":
            yield from enumerate(csv.DictReader(handle), start=2)
            return
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, InvalidParameters(f"not JSON: {exc.msg}")
                    continue
                yield number, row if isinstance(row, dict) else InvalidParameters("a row must be a JSON object")


def _from_manifest(path: Path, instruction: str, params: EditParams) -> tuple[list[BatchInput], list[Rejected]]:
    sources, rejected = [], []
    for number, row in _manifest_rows(path):
        where = f"{path}:{number}"
        try:
            if isinstance(row, InvalidParameters):
                raise row
            unknown = set(row) - {"input", "instruction", "output"} - set(PARAM_PARSERS)
            if unknown:
                raise InvalidParameters(f"unknown column(s): {', '.join(sorted(unknown))}")
            value = str(row.get("input") or "")
            if not value:
                raise InvalidParameters("no input")
            uri = value if "://" in value else str((path.parent / value).absolute())  # not the worker's folder
            text = str(row.get("instruction") or instruction).strip()
            if not text:
                raise InvalidParameters("empty instruction")
            output = row.get("output") or (value.split("://", 1)[-1] if "://" in value else value)
            sources.append(BatchInput(uri, safe_relative(output), text, _row_params(row, params)))
        except ItsdError as exc:
            rejected.append(Rejected(where, exc))
    return sources, rejected


def collect_sources(inputs: list[str], instruction: str, params: EditParams) -> tuple[list[BatchInput], list[Rejected]]:
    """Every image the inputs name, each with its output key; two sources writing one key are refused."""
    sources: list[BatchInput] = []
    rejected: list[Rejected] = []
    plain: list[str] = []
    for value in inputs:
        if Path(value).suffix.lower() in MANIFEST_SUFFIXES and Path(value).is_file():
            found, bad = _from_manifest(Path(value), instruction, params)
            sources += found
            rejected += bad
        elif _is_url(value):
            sources += [BatchInput(uri, rel, instruction, params) for uri, rel in _remote_files(value)]
        else:
            plain.append(value)
    if plain:
        # absolute: a worker runs in a folder of its own, and would read a relative path there
        sources += [BatchInput(str(item.path.absolute()), item.relative, instruction, params) for item in expand(plain)]
    keys: dict[PurePosixPath, str] = {}
    for source in sources:
        other = keys.setdefault(source.relative, source.uri)
        if other != source.uri:
            raise InvalidParameters(f"{other} and {source.uri} would both be written as {source.relative}")
    return sources, rejected
