"""Turning files, folders and globs into inputs, each with the relative name its output mirrors.

One rule for symlinks, in `itsd edit`, `run` and `submit` alike (`within`): a symlink is followed, and what it
names must lie under the folder it was found through (a folder given, a glob's fixed part, or the named file's
own folder). A link out of there is refused as `outside_roots`, alone; `itsd run` then gives its workers the
folders of what the links name, which its workers' own check (`core.access`) accepts.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import InputNotFound, InvalidParameters, ItsdError, OutsideRoots

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class InputFile:
    path: Path
    relative: PurePosixPath  # where the output goes under the destination: photos/2019/a.jpg -> 2019/a.jpg


@dataclass(frozen=True)
class Rejected:
    where: str  # the input, or the manifest and line, as the user gave it
    error: ItsdError

    @property
    def message(self) -> str:
        """Where, then why; the input once, when the reason already starts with it (as access errors do)."""
        reason = str(self.error)
        return reason if reason.startswith(f"{self.where}: ") else f"{self.where}: {reason}"


def within(path: Path, root: Path) -> None:
    """The symlink rule: `path`, its links followed, must lie under `root` (the folder it was found through)."""
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise OutsideRoots(f"{path}: a symlink to {target}, outside {root}, the folder it was found in")


def _images_under(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _glob_root(pattern: str) -> Path:
    """The longest leading part of a glob without wildcards: outputs mirror paths below it."""
    parts = Path(pattern).parts
    fixed = parts[: next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))]
    return Path(*fixed) if fixed else Path()


def expand(patterns: list[str]) -> tuple[list[InputFile], list[Rejected]]:
    """Files as given (named by their file name), folders recursively, globs (named below their root); and those
    refused alone: a symlink to outside the folder it was found through (`within`).

    A missing path or a glob that matches nothing is an error; duplicates are dropped, and two
    different inputs that would write the same output name are refused.
    """
    found: dict[Path, InputFile] = {}
    rejected: list[Rejected] = []
    for pattern in patterns:
        path = Path(pattern)
        if glob.has_magic(pattern):
            root = _glob_root(pattern)
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise InputNotFound(f"{pattern}: matches no files")
            items = [InputFile(m, safe_relative(m.relative_to(root))) for m in matches]
        elif path.is_dir():
            root = path
            items = [InputFile(p, safe_relative(p.relative_to(path))) for p in _images_under(path)]
        elif path.is_file():
            root = path.parent
            items = [InputFile(path, safe_relative(Path(path.name)))]
        else:
            raise InputNotFound(f"{pattern}: no such file or folder")
        for item in items:
            try:
                within(item.path, root)
            except OutsideRoots as exc:
                rejected.append(Rejected(str(item.path), exc))
                continue
            found.setdefault(item.path.resolve(), item)
    outputs: dict[PurePosixPath, Path] = {}
    for item in found.values():
        other = outputs.setdefault(item.relative, item.path)
        if other != item.path:
            raise InvalidParameters(f"{other} and {item.path} would both be written as {item.relative}")
    return list(found.values()), rejected


def safe_relative(relative: Path | PurePosixPath | str) -> PurePosixPath:
    """A relative output key that cannot escape the destination (no absolute paths, no `..`)."""
    pure = PurePosixPath(str(relative).replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or str(pure) == ".":
        raise InvalidParameters(f"{relative}: output path would escape the destination folder")
    return pure


def check_destination(inputs: list[InputFile], destination: Path) -> None:
    """Refuse a destination where an output would replace its own input (e.g. --out set to the input folder)."""
    root = destination.resolve()
    for item in inputs:
        if (root / item.relative).resolve() == item.path.resolve():
            raise InvalidParameters(
                f"writing to {destination} would overwrite the input {item.path}; choose another folder"
            )
