"""What a batch is made of: one `BatchInput` (an image, its instruction, parameters and output key) per image,
from files, folders, globs, URLs or manifests.

A manifest is a `.csv` or `.jsonl` file whose rows name an `input` (a path relative to the manifest, a file://
URI, or a URL) and may set `instruction`, `output` (the key under the destination; by default the input as
written, without its scheme or a leading /) and any edit parameter (`steps`, `guidance_scale`,
`image_guidance_scale`, `seed`, `scheduler`, `max_side`, `detail`, `guidance_until`), overriding the command
line's for that row, with the command line's types and ranges. A row that is wrong fails alone, with its line
number; so does a URL whose scheme the fleet refuses (ITSD_URL_SCHEMES), which is never fetched here.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from core.access import Access
from core.errors import InputNotFound, InvalidParameters, ItsdError
from core.inputs import IMAGE_SUFFIXES, Rejected, expand, safe_relative, within
from core.params import LIMITS, EditParams
from core.storage import locate, remote_fs, storage_error

MANIFEST_SUFFIXES = (".csv", ".jsonl")
# How a manifest cell given as text (CSV's are all text) becomes each EditParams field: ranges and finiteness are
# then EditParams' (core.params.LIMITS, as the CLI's options); a JSON number or bool goes to EditParams as it is,
# so 2.9 steps, a seed of 7.8 or true are refused there, never rounded or counted as 1.
PARAM_PARSERS = {
    **{name: int if limit.whole else float for name, limit in LIMITS.items()},
    "scheduler": str,
    "metadata": str,  # all, no-gps or none (--strip-gps, --strip-metadata)
}
TEXT_COLUMNS = ("input", "instruction", "output")


@dataclass(frozen=True)
class BatchInput:
    uri: str  # local path (absolute) or URL
    relative: PurePosixPath  # the output key under the destination
    instruction: str
    params: EditParams


def _remote_files(pattern: str) -> list[tuple[str, PurePosixPath]]:
    """Files under a URL (a file, a folder, or a glob), named below the part without wildcards."""
    protocol = locate(pattern).scheme
    try:
        fs, path = remote_fs(pattern)
        if glob.has_magic(path):
            root = path[: path.find(next(c for c in path if c in "*?["))].rsplit("/", 1)[0]
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            root, found = path.rstrip("/"), sorted(fs.find(path))
        else:
            root, found = path.rsplit("/", 1)[0], [path]
    except OSError as exc:
        raise storage_error(f"{pattern}: cannot list", exc) from None
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
            overrides[name] = parse(value) if isinstance(value, str) else value
        except ValueError:
            kind = {int: "a whole number", float: "a number"}[parse]
            raise InvalidParameters(f"{name}: {value!r} is not {kind}") from None
    return EditParams.from_dict({**params.to_dict(), **overrides})


def _text(row: dict[str, Any], column: str) -> str:
    """A text column's value ("" when absent); a number or any other JSON value is refused, not turned to text."""
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidParameters(f"{column} must be text, got {json.dumps(value)}")
    return value


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


def _from_manifest(
    path: Path, instruction: str, params: EditParams, access: Access
) -> tuple[list[BatchInput], list[Rejected]]:
    sources, rejected = [], []
    for number, row in _manifest_rows(path):
        where = f"{path}:{number}"
        try:
            if isinstance(row, InvalidParameters):
                raise row
            unknown = set(row) - set(TEXT_COLUMNS) - set(PARAM_PARSERS)
            if unknown:
                raise InvalidParameters(f"unknown column(s): {', '.join(sorted(unknown))}")
            value = _text(row, "input")
            if not value:
                raise InvalidParameters("no input")
            text = (_text(row, "instruction") or instruction).strip()
            if not text:
                raise InvalidParameters("empty instruction")
            uri, key = _source(value, access, path.parent)
            sources.append(BatchInput(uri, safe_relative(_text(row, "output") or key), text, _row_params(row, params)))
        except ItsdError as exc:
            rejected.append(Rejected(where, exc))
    return sources, rejected


def _source(value: str, access: Access, folder: Path) -> tuple[str, str]:
    """A manifest row's input as a job names it (an allowed URL, or an absolute local path, relative ones taken
    from `folder`, not the worker's), and the output key it names by default. Nothing is read yet."""
    location = access.check_scheme(value)
    if location.path is None:
        return value, location.key
    local = (folder / location.path).absolute()
    within(local, local.parent)
    return str(local), location.key


def collect_sources(
    inputs: list[str], instruction: str, params: EditParams, access: Access
) -> tuple[list[BatchInput], list[Rejected]]:
    """Every image the inputs name, each with its output key; two sources writing one key are refused. Only
    schemes `access` allows are touched (a URL the workers would refuse is not fetched here either): any other
    input, and a symlink out of its folder (`core.inputs.within`), is rejected alone."""
    sources: list[BatchInput] = []
    rejected: list[Rejected] = []
    plain: list[str] = []
    for value in inputs:
        try:
            location = access.check_scheme(value)
            if location.path is None:
                sources += [BatchInput(uri, rel, instruction, params) for uri, rel in _remote_files(value)]
            elif location.path.suffix.lower() in MANIFEST_SUFFIXES and location.path.is_file():
                found, bad = _from_manifest(location.path, instruction, params, access)
                sources += found
                rejected += bad
            else:
                plain.append(str(location.path))
        except ItsdError as exc:
            rejected.append(Rejected(value, exc))
    if plain:
        # absolute: a worker runs in a folder of its own, and would read a relative path there
        found, bad = expand(plain)
        sources += [BatchInput(str(item.path.absolute()), item.relative, instruction, params) for item in found]
        rejected += bad
    keys: dict[PurePosixPath, str] = {}
    for source in sources:
        other = keys.setdefault(source.relative, source.uri)
        if other != source.uri:
            raise InvalidParameters(f"{other} and {source.uri} would both be written as {source.relative}")
    return sources, rejected
