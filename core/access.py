"""What a worker may touch: local paths under its declared roots, and URLs of its allowed schemes only.

Whoever can enqueue to Redis can ask a worker to read or write any URI, so the worker checks every job's
input and output before it touches either: a local path is resolved first (`..` and symlinks followed),
then must lie under one of the roots (`ITSD_INPUT_ROOTS`, `ITSD_OUTPUT_ROOTS`, colon-separated); a URL's
scheme must be allowed (`ITSD_URL_SCHEMES`; `file` stands for local paths, plain or file://, as
`core.storage.locate` tells them apart). A worker with no roots touches no local path. A job outside them
fails at once, as `outside_roots`, naming the roots. Producers apply the same scheme rule to what they read, so
a manifest cannot make the submitting host fetch what the fleet refuses.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import OutsideRoots
from core.storage import LOCAL, Location, locate

_OBJECT_STORES = {"s3": "s3fs", "gs": "gcsfs"}  # schemes allowed by default when their filesystem is installed


def default_schemes() -> tuple[str, ...]:
    return (LOCAL, *(s for s, module in _OBJECT_STORES.items() if importlib.util.find_spec(module) is not None))


def parse_roots(value: str) -> tuple[Path, ...]:
    """Colon-separated folders, resolved (so a symlinked root is compared as what it points to)."""
    return tuple(Path(part).expanduser().resolve() for part in value.split(os.pathsep) if part.strip())


@dataclass(frozen=True)
class Access:
    input_roots: tuple[Path, ...] = ()
    output_roots: tuple[Path, ...] = ()
    schemes: tuple[str, ...] = (LOCAL,)

    def check_scheme(self, uri: str) -> Location:
        """Where `uri` lies, if its scheme is allowed; else OutsideRoots. Producers check this before they touch
        an input or a destination, workers before every job."""
        location = locate(uri)
        if location.scheme not in self.schemes:
            allowed = ", ".join(self.schemes)
            raise OutsideRoots(f"{uri}: {location.scheme}:// is not allowed (allowed: {allowed}; ITSD_URL_SCHEMES)")
        return location

    def check_input(self, uri: str) -> None:
        self._check(uri, self.input_roots, "input")

    def check_output(self, uri: str) -> None:
        self._check(uri, self.output_roots, "output")

    def _check(self, uri: str, roots: tuple[Path, ...], kind: str) -> None:
        path = self.check_scheme(uri).path
        if path is None:
            return
        if not path.is_absolute():
            raise OutsideRoots(f"{uri}: a relative path; jobs name local files by absolute path")
        if not roots:
            raise OutsideRoots(
                f"{uri}: this worker has no {kind} roots and touches no local path; declare them with "
                f"ITSD_{kind.upper()}_ROOTS or --{kind}-root"
            )
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise OutsideRoots(f"{uri}: outside this worker's {kind} roots ({os.pathsep.join(map(str, roots))})")
