"""Processes on this machine: a private `redis-server` and local `itsd worker`s, started and stopped
cleanly (no orphans, Ctrl-C included), and a `Supervisor` that starts a worker again when it dies.
`itsd run`, the tests and the fleet benchmark use them."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from core.errors import LocalProcessFailed
from core.records import Keys


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_group(process: subprocess.Popen, grace: float, first: int = signal.SIGTERM) -> None:
    """Signal the process's whole group (a Celery worker and its pool children), then kill what is left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError):  # pool children outlive a parent that was SIGKILLed
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class RedisServer:
    """A password-protected redis-server on a free loopback port. `appendonly=True` keeps queued jobs and
    results across `restart()` (what compose's Redis does)."""

    def __init__(
        self,
        folder: Path | None = None,
        appendonly: bool = False,
        port: int | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise LocalProcessFailed(
                "redis-server is not installed: apt-get install redis-server (or pass --broker URL to use another)"
            )
        self._owned = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="itsd-redis-")) if folder is None else folder
        self.folder.mkdir(parents=True, exist_ok=True)  # redis-server exits without a word if it cannot chdir there
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = secrets.token_hex(16)
        self.tls = tls  # (certificate, key, CA): serve TLS only, at rediss://
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tls:
            query = f"ssl_cert_reqs=required&ssl_ca_certs={self.tls[2]}"
            return f"rediss://:{self.password}@localhost:{self.port}/0?{query}"
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _listen(self) -> list[str]:
        if not self.tls:
            return [f"port {self.port}"]
        cert, key, ca = self.tls
        return [
            "port 0",
            f"tls-port {self.port}",
            f'tls-cert-file "{cert}"',
            f'tls-key-file "{key}"',
            f'tls-ca-cert-file "{ca}"',
            "tls-auth-clients no",
        ]

    def start(self, timeout: float = 20.0) -> RedisServer:
        config = "\n".join(
            [
                *self._listen(),
                "bind 127.0.0.1",
                f"requirepass {self.password}",  # on stdin, not argv: `ps` shows no password
                f'dir "{self.folder}"',
                'save ""',
                f"appendonly {'yes' if self.appendonly else 'no'}",
                "maxmemory-policy noeviction",
                "logfile redis.log",
            ]
        )
        self.process = subprocess.Popen(
            ["redis-server", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(config.encode() + b"\n")
        self.process.stdin.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:] if self._has_log() else ""
                raise LocalProcessFailed(f"redis-server exited with status {self.process.returncode}: {log}")
            try:
                if client.ping():
                    return
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):  # starting, or loading its AOF
                time.sleep(0.05)
        raise LocalProcessFailed(f"redis-server did not answer on port {self.port} within {timeout:.0f} s")

    def _has_log(self) -> bool:
        return (self.folder / "redis.log").is_file()

    def stop(self) -> None:
        """Stop (an append-only server flushes its log first, as on a clean restart)."""
        if self.process is not None:
            _stop_group(self.process, grace=10)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            _stop_group(self.process, grace=0, first=signal.SIGKILL)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)


class LocalWorker:
    """One `itsd worker` process (and its pool children) in its own process group, logging to a file."""

    def __init__(
        self,
        url: str,
        models: dict[str, str],
        name: str,
        log_path: Path,
        concurrency: int = 1,
        extra_env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        args = [arg for n, folder in models.items() for arg in ("--model", f"{n}={folder}")]
        self.command = command or [sys.executable, "-m", "producer.cli", "worker", *args]
        self.command += ["--concurrency", str(concurrency), "--hostname", f"{name}@%h"]
        self.env = {**os.environ, **(extra_env or {}), "ITSD_BROKER_URL": url}  # the password stays off argv
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalWorker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM: finish the running job and stop; after `grace` seconds, kill the group."""
        if self.process is not None:
            _stop_group(self.process, grace)

    def kill(self) -> None:
        if self.process is not None:
            _stop_group(self.process, grace=0, first=signal.SIGKILL)


RESTARTS = 3  # times a Supervisor starts a worker again that died (a worker that cannot start dies each time)


class Supervisor:
    """Watches local workers: one that died (the OOM killer, a SIGKILL) is named on one line, with how it ended
    and a copy of its log kept in the temporary folder, and started again, at most RESTARTS times. The job it
    held goes back to the queue (core.holds). Raises LocalProcessFailed, with the log's end, once none is left."""

    def __init__(self, workers: list[LocalWorker]) -> None:
        self.workers = workers
        self.restarts = {w.name: 0 for w in workers}

    def __call__(self) -> list[str]:
        """What happened since the last call, one line each."""
        lines = []
        for worker in self.workers:
            if worker.process is None or worker.alive() or self.restarts[worker.name] > RESTARTS:
                continue
            code = worker.process.returncode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            kept = Path(tempfile.gettempdir()) / f"itsd-{worker.name}-{worker.process.pid}.log"
            shutil.copyfile(worker.log_path, kept)
            worker.kill()  # what is left of its process group: pool children outlive a killed parent
            self.restarts[worker.name] += 1
            if self.restarts[worker.name] > RESTARTS:
                lines.append(
                    f"worker {worker.name} died ({how}; log {kept}), not started again: it died {RESTARTS + 1} times"
                )
                continue
            worker.start()
            lines.append(
                f"worker {worker.name} died ({how}; log {kept}); started another, its job goes back to the queue"
            )
        if all(self.restarts[w.name] > RESTARTS for w in self.workers):
            last = self.workers[-1]
            raise LocalProcessFailed(
                f"every worker died {RESTARTS + 1} times; the end of {last.name}'s log:\n{last.log_tail()}"
            )
        return lines


def wait_registered(client: Any, models: list[str], workers: list[LocalWorker], timeout: float = 120.0) -> None:
    """Until every model is registered by a worker; a worker that dies first is reported with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [w for w in workers if not w.alive()]
        if dead:
            raise LocalProcessFailed(f"worker {dead[0].name} exited at start:\n{dead[0].log_tail()}")
        if all(client.hexists(Keys.models, m) for m in models):
            return
        time.sleep(0.1)
    raise LocalProcessFailed(f"workers did not start within {timeout:.0f} s:\n{workers[0].log_tail()}")
