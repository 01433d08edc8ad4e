"""Reading inputs and writing outputs by URI (a local path, file://, or any fsspec URL such as s3://),
so a reader never sees half a file: a temporary sibling then an atomic rename, or one object put."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import (
    ImageTooLarge,
    InputNotFound,
    InvalidImage,
    InvalidParameters,
    ItsdError,
    StorageError,
    StorageRefused,
)

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once: temporary files and folders are private until published


def usual_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() would give: what outputs get once they are complete."""
    return (0o777 if directory else 0o666) & ~_UMASK


def write_atomic(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's word for a file where the folder should be
        raise NotADirectoryError(errno.ENOTDIR, "a file is where its folder should be") from None
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, usual_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


LOCAL = "file"  # the scheme of local paths, plain or file://, as ITSD_URL_SCHEMES names it
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)  # RFC 3986's scheme, then ://


@dataclass(frozen=True)
class Location:
    """Where an input or output named by a path or URI lies: its scheme (`file` for a local path) and the rest."""

    scheme: str
    rest: str  # after `scheme://`; a plain path as given

    @property
    def path(self) -> Path | None:
        """The local path (file:// taken off), or None for a URL that fsspec opens."""
        return Path(self.rest) if self.scheme == LOCAL else None

    @property
    def key(self) -> str:
        """The output key it names by default: the path as given, or the URL's after its scheme, without a
        leading /."""
        return self.rest.lstrip("/")


def locate(value: str) -> Location:
    """The one rule for every path and URI: `SCHEME://...` is a URL, except that file:// names a local path;
    anything else is a local path. The scheme is lower-cased, as URLs' are."""
    match = _SCHEME.match(value)
    if match is None:
        return Location(LOCAL, value)
    return Location(match[1].lower(), match[2])


def remote_fs(uri: str) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise InvalidParameters(f"{uri}: URLs need fsspec: pip install 'itsd[worker]'") from None
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs
        raise InvalidParameters(f"{uri}: {exc}") from None


def join_uri(destination: str, relative: str) -> str:
    """DEST + a safe relative key, for local folders and URLs alike."""
    local = locate(destination).path
    if local is not None:
        return str(local / relative)
    return destination.rstrip("/") + "/" + relative


# ITSD_MAX_INPUT_BYTES' default: above a 24 MP 16-bit TIFF (~150 MB uncompressed); JPEGs are far smaller
DEFAULT_MAX_INPUT_BYTES = 256 * 2**20


def check_readable(path: Path, max_bytes: int) -> None:
    """Refuse, before reading, a local file that cannot be read to an end: a device, FIFO or socket, or one over
    `max_bytes`. A folder raises IsADirectoryError and a missing file FileNotFoundError, as reading would."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidImage("not a regular file (a device, FIFO or socket)")
    _check_size(info.st_size, max_bytes)


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageTooLarge(f"{size} bytes is over the input limit of {max_bytes} (ITSD_MAX_INPUT_BYTES)")


def read_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes at `uri`; a device, FIFO or socket, or anything over `max_bytes`, is refused before reading."""
    local = locate(uri).path
    try:
        if local is not None:
            check_readable(local, max_bytes)
            with local.open("rb") as handle:
                data = handle.read(max_bytes + 1)  # the file may have grown since stat
        else:
            fs, path = remote_fs(uri)
            _check_size(fs.size(path) or 0, max_bytes)
            data = fs.cat_file(path)
        _check_size(len(data), max_bytes)
        return data
    except (InvalidImage, ImageTooLarge) as exc:
        raise type(exc)(f"{uri}: {exc}") from None
    except FileNotFoundError:
        raise InputNotFound(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise InputNotFound(f"{uri}: is a folder, not an image") from None
    except OSError as exc:
        raise storage_error(f"{uri}: cannot read", exc) from None


def uri_exists(uri: str) -> bool:
    local = locate(uri).path
    if local is not None:
        return local.is_file()
    fs, path = remote_fs(uri)
    try:
        return fs.exists(path)
    except OSError as exc:
        raise storage_error(f"{uri}: cannot check", exc) from None


def write_uri(uri: str, data: bytes) -> None:
    """Write so a reader never sees half an output: temp then rename locally; one put for object stores."""
    local = locate(uri).path
    try:
        if local is not None:
            write_atomic(local, data)
        else:
            fs, path = remote_fs(uri)
            fs.pipe_file(path, data)
    except FileNotFoundError as exc:  # locally the folders are made first: a missing bucket or share
        raise StorageRefused(f"{uri}: cannot write: {exc.strerror or exc}") from None
    except OSError as exc:
        raise storage_error(f"{uri}: cannot write", exc) from None


# What waiting cannot heal: read-only, denied, a file where a folder should be (or the reverse), a bad name
_REFUSALS = frozenset(
    {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}
)


def storage_error(what: str, exc: OSError) -> ItsdError:
    """`exc` as a job error: permanent (`StorageRefused`) when retrying cannot help, else a transient
    `StorageError` (a full disk, an I/O error or a timeout may clear, or another worker may succeed)."""
    message = f"{what}: {exc.strerror or exc}"
    if exc.errno in _REFUSALS or isinstance(exc, PermissionError | NotADirectoryError | IsADirectoryError):
        return StorageRefused(message)
    return StorageError(message)
