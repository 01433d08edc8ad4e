"""Helpers for the container tests and bench/containers.py: a Docker engine (the running one, or a dockerd
started here), the images built without a registry by scripts/images, and compose.cpu.yaml run as a project of
its own, whose images are never pulled and whose Redis and workers sit on an internal network."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from producer.local import free_port

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "scripts" / "images"
# Every service of compose.cpu.yaml: an image that is missing fails instead of being pulled. Redis and the
# workers have only the internal network; Flower and the exporter also an ordinary one, to publish their ports.
OVERRIDE = {
    "services": {
        "redis": {"pull_policy": "never"},
        "worker": {"pull_policy": "never"},
        "producer": {"pull_policy": "never"},
        "flower": {"pull_policy": "never", "networks": ["default", "edge"]},
        "metrics": {"pull_policy": "never", "networks": ["default", "edge"]},
    },
    "networks": {"default": {"internal": True}, "edge": {}},
}


def run(*command: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command's result, output captured as text."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def checked(*command: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """A command's standard output; a failure raises with the command and the end of its output."""
    done = run(*command, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """A Docker engine for the block: the one running, or a dockerd started now and stopped after by its pid.
    Raises RuntimeError with the reason when there is none and none can start."""
    if shutil.which("docker") is None:
        raise RuntimeError("no docker client: apt-get install -y docker.io (scripts/setup does)")
    if run("docker", "info").returncode == 0:
        yield
        return
    if shutil.which("dockerd") is None or os.getuid() != 0:
        raise RuntimeError(f"no Docker engine runs and none can start here: {run('docker', 'info').stderr.strip()}")
    log = Path(tempfile.mkstemp(prefix="dockerd-", suffix=".log")[1])
    with log.open("wb") as out:
        dockerd = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while run("docker", "info").returncode != 0:
            if dockerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        dockerd.terminate()
        try:
            dockerd.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dockerd.kill()
            dockerd.wait()


def build_images(flavour: str) -> dict[str, float]:
    """`scripts/images base`, `wheelhouse FLAVOUR`, `build FLAVOUR`: seconds each (the base and the wheels
    are reused when cached)."""
    seconds = {}
    for step in (["base"], ["wheelhouse", flavour], ["build", flavour]):
        start = time.monotonic()
        checked(str(IMAGES), *step, timeout=1800)
        seconds[step[0]] = round(time.monotonic() - start, 1)
    return seconds


def image_size(tag: str) -> int:
    """The image's size in bytes, as `docker images` reports it."""
    return int(checked("docker", "image", "inspect", "-f", "{{.Size}}", tag).strip())


def compose_command() -> list[str]:
    """`docker compose` (v2) where the plugin is installed, else Debian's docker-compose (1.29)."""
    if run("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor docker-compose: apt-get install -y docker-compose")


def bundled_model(models: Path, name: str) -> Path:
    """models/itsd-tiny exported (once, cached as `itsd run` does) and copied to MODELS/NAME for a volume."""
    from core.settings import Settings
    from producer.run import artifacts_for

    exported = artifacts_for(str(REPO / "models" / "itsd-tiny"), Settings.from_env(), lambda line: None)
    shutil.copytree(exported, models / name)
    return models / name


class CpuFleet:
    """compose.cpu.yaml as project NAME, with its data, models and ports under ROOT: `up`, the producer, `down`.
    The workers run as the caller's uid (1000 for root), so outputs on the host volume are the caller's."""

    def __init__(self, root: Path, name: str, model: str = "tiny") -> None:
        self.root, self.name, self.model = root, name, model
        self.uid = os.getuid() or 1000
        self.data = root / "data"
        self.data.mkdir(parents=True)
        os.chown(self.data, self.uid, self.uid)
        bundled_model(root / "models", model)
        self.override = root / "compose.test.yaml"
        self.override.write_text(yaml.safe_dump(OVERRIDE))
        self.flower_port, self.metrics_port = free_port(), free_port()
        self.flower_password = os.urandom(8).hex()
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": name,
            "REDIS_PASSWORD": os.urandom(8).hex(),
            "FLOWER_PASSWORD": self.flower_password,
            "ITSD_MODEL": model,
            "ITSD_MODELS": str(root / "models"),
            "ITSD_DATA": str(self.data),
            "ITSD_UID": str(self.uid),
            "ITSD_GID": str(self.uid),
            "ITSD_FLOWER_PORT": str(self.flower_port),
            "ITSD_QUEUE_METRICS_PORT": str(self.metrics_port),
            "ITSD_REDIS_IMAGE": "itsd-base:bookworm",
            "ITSD_VISIBILITY_TIMEOUT": "20",  # a killed worker's job is handed out again after 20 s
            "ITSD_RUNTIME": "auto",  # OpenVINO in the CPU image (not the test session's onnxruntime default)
            "ITSD_PRECISION": "fp32",  # no bf16/int8 probe at load: minutes on 2 shared cores (test_runtimes has it)
        }
        self.files = ["-f", str(REPO / "compose.cpu.yaml"), "-f", str(self.override)]
        self.command = compose_command()

    def compose(self, *args: str, timeout: float = 300) -> str:
        """`compose -f compose.cpu.yaml -f OVERRIDE ARGS` in the project; raises on failure."""
        return checked(*self.command, *self.files, *args, timeout=timeout, env=self.env)

    def producer(self, *args: str) -> subprocess.Popen:
        """`itsd ARGS` in a one-off producer container, running."""
        command = [*self.command, *self.files, "run", "--rm", "-T", "producer", *args]
        return subprocess.Popen(command, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def containers(self, service: str) -> list[str]:
        """The ids of SERVICE's containers."""
        return self.compose("ps", "-q", service).split()

    def status(self, batch: str) -> dict:
        """`itsd status BATCH --json`, from a producer container."""
        out = self.compose("run", "--rm", "-T", "producer", "status", batch, "--json")
        return json.loads(out[out.index("{") :])  # after compose's own lines, if it writes them there

    def redis(self, *command: str) -> str:
        """A redis-cli COMMAND in the Redis container (the password through its environment)."""
        auth = f"REDISCLI_AUTH={self.env['REDIS_PASSWORD']}"
        return checked("docker", "exec", "-e", auth, self.containers("redis")[0], "redis-cli", *command)

    def get(self, port: int, path: str, password: str | None = None) -> tuple[int, str]:
        """HTTP GET http://127.0.0.1:PORT/PATH (Flower's basic auth with PASSWORD): status and body."""
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if password is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(f"itsd:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, ""

    def left_behind(self) -> dict[str, list[str]]:
        """The project's containers, volumes and networks that still exist."""
        label = f"label=com.docker.compose.project={self.name}"
        listed = {"container": ("ps", "-a"), "volume": ("volume", "ls"), "network": ("network", "ls")}
        return {kind: checked("docker", *ls, "-q", "--filter", label).split() for kind, ls in listed.items()}

    def down(self) -> None:
        """`compose down -v`: containers, networks and volumes gone."""
        self.compose("--profile", "tools", "down", "-v", "--remove-orphans", timeout=180)
