"""Writing outputs so a reader never sees half a file: a temporary sibling, then an atomic rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once: temporary files and folders are private until published


def usual_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() would give: what outputs get once they are complete."""
    return (0o777 if directory else 0o666) & ~_UMASK


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
