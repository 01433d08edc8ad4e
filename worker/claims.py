"""Claims: at most one worker computes a job at a time, even when Redis delivers it twice.

A claim is a Redis key `itsd:claim:<job id>` holding its owner (`host:pid:nonce`) with a TTL that a
thread renews while the job runs. A worker that dies stops renewing, so its claim expires and a
redelivered copy of the job takes over; on the same host a dead owner is noticed at once (its pid is
gone), which is what happens when a pool child is killed and Celery hands the job straight back.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from core.holds import HOST, owner_is_dead
from core.records import Keys

_LUA = Path(__file__).parent / "lua"
_RENEW, _RELEASE, _STEAL = ((_LUA / f"claim_{name}.lua").read_text() for name in ("renew", "release", "steal"))


class Claim:
    """`with claim:` holds the job's claim (renewed in the background) and releases it on exit."""

    def __init__(self, client: Any, job_id: str, ttl: float) -> None:
        self.client = client
        self.key = Keys.claim(job_id)
        self.ttl_ms = max(1000, int(ttl * 1000))
        self.owner = f"{HOST}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def try_acquire(self) -> bool:
        if self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            return True
        holder = self.client.get(self.key)
        if holder is not None and owner_is_dead(holder.decode()):
            return bool(self.client.eval(_STEAL, 1, self.key, self.owner, self.ttl_ms, holder))
        return False

    def acquire(self, done_elsewhere: Callable[[], bool], poll: float = 0.5) -> bool:
        """Take the claim, waiting while a live worker holds it. False (and no claim held): the job is
        done already, which is checked once the claim is ours, so no other copy can be finishing it."""
        while True:
            if self.try_acquire():
                if done_elsewhere():
                    self.release()
                    return False
                return True
            if done_elsewhere():
                return False
            time.sleep(min(poll, self.ttl_ms / 4000))

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.owner)

    def _renew(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                self.client.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms)
            except Exception:  # Redis away for a moment: keep trying until the job ends
                continue

    def __enter__(self) -> Claim:
        self._renewer = threading.Thread(target=self._renew, name="itsd-claim", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        self.release()
