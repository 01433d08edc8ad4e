"""Settings read from the environment once; flags override them where a command offers one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from core.access import Access, default_schemes, parse_roots
from core.errors import InvalidParameters
from core.images import DEFAULT_MAX_PIXELS
from core.storage import DEFAULT_MAX_INPUT_BYTES

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
RUNTIMES = ("auto", "onnxruntime", "openvino")  # ITSD_RUNTIME; worker.runtimes decides auto
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # ITSD_PRECISION


def _positive_int(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name, str(default))
    if not value.isdigit() or int(value) <= 0:
        raise InvalidParameters(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def _positive_float(env: dict[str, str], name: str, default: float) -> float:
    value = env.get(name, str(default))
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0 or number == float("inf"):
        raise InvalidParameters(f"{name} must be a positive number, got {value!r}")
    return number


def _flag(env: dict[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value not in ("", "0", "1", "false", "true", "no", "yes"):
        raise InvalidParameters(f"{name} must be 1 or 0, got {value!r}")
    return value in ("1", "true", "yes")


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itsd"


@dataclass(frozen=True)
class Settings:
    broker_url: str | None = None  # ITSD_BROKER_URL: redis://, rediss://, with password if any
    max_pixels: int = DEFAULT_MAX_PIXELS  # ITSD_MAX_PIXELS: refuse larger images before decoding
    providers: tuple[str, ...] = DEFAULT_PROVIDERS  # ITSD_PROVIDERS: comma-separated, in preference order
    providers_asked: bool = False  # ITSD_PROVIDERS was set: a provider it names and this build lacks is a warning
    cache_dir: Path = Path()  # ITSD_CACHE_DIR: exported artifacts cached by checkpoint hash
    # The queue. A message not acknowledged within the visibility timeout is delivered again, so it must
    # exceed the longest job (a 4096-px edit on a slow CPU is minutes; an hour leaves room).
    visibility_timeout: int = 3600  # ITSD_VISIBILITY_TIMEOUT, seconds
    claim_ttl: int = 60  # ITSD_CLAIM_TTL: seconds a running job's claim lives unless its worker renews it
    max_retries: int = 5  # ITSD_MAX_RETRIES: transient failures retried before the job is dead-lettered
    result_expires: int = 7 * 24 * 3600  # ITSD_RESULT_EXPIRES: seconds results and batch records are kept
    inline_max_bytes: int = 4 * 2**20  # ITSD_INLINE_MAX_BYTES: cap on an image sent inline (--inline)
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES  # ITSD_MAX_INPUT_BYTES: larger inputs are refused unread
    connect_timeout: float = 5.0  # ITSD_CONNECT_TIMEOUT: seconds a command waits for Redis before it says why not
    # ITSD_INPUT_ROOTS, ITSD_OUTPUT_ROOTS, ITSD_URL_SCHEMES: what a worker may touch (core.access)
    access: Access = field(default_factory=Access)
    tile_batch: int = 1  # ITSD_TILE_BATCH: tiles per UNet call (each with its guidance copies); more helps GPUs
    batch_jobs: int = 1  # ITSD_BATCH_JOBS: jobs a worker runs at once with their UNet calls batched (worker.batching)
    # ITSD_RUNTIME and ITSD_PRECISION (RUNTIMES, PRECISIONS) are read by --runtime and --precision
    # (producer.options.runtime_options)
    bf16_min_psnr: float = 35.0  # ITSD_BF16_MIN_PSNR: dB a bf16 probe edit must keep against fp32
    # ITSD_INT8_MIN_PSNR: dB an int8 probe edit must keep against fp32 (worker.int8). 35, as bf16's: weights-only
    # int8 rounds each weight to one of 256 levels of its output channel, an error of bf16's kind and size
    int8_min_psnr: float = 35.0
    warm_up_timeout: float = 900.0  # ITSD_WARM_UP_TIMEOUT: seconds a model may take to load and run one edit
    # ITSD_CELERY_EVENTS=1: Celery's task events, for Flower (off by default: a few Redis writes per job)
    celery_events: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        providers = env.get("ITSD_PROVIDERS")
        return cls(
            broker_url=env.get("ITSD_BROKER_URL") or None,
            max_pixels=_positive_int(env, "ITSD_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            providers=tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else DEFAULT_PROVIDERS,
            providers_asked=bool(providers),
            cache_dir=Path(env["ITSD_CACHE_DIR"]) if env.get("ITSD_CACHE_DIR") else _cache_home(),
            visibility_timeout=_positive_int(env, "ITSD_VISIBILITY_TIMEOUT", cls.visibility_timeout),
            claim_ttl=_positive_int(env, "ITSD_CLAIM_TTL", cls.claim_ttl),
            max_retries=_positive_int(env, "ITSD_MAX_RETRIES", cls.max_retries),
            result_expires=_positive_int(env, "ITSD_RESULT_EXPIRES", cls.result_expires),
            inline_max_bytes=_positive_int(env, "ITSD_INLINE_MAX_BYTES", cls.inline_max_bytes),
            max_input_bytes=_positive_int(env, "ITSD_MAX_INPUT_BYTES", cls.max_input_bytes),
            tile_batch=_positive_int(env, "ITSD_TILE_BATCH", cls.tile_batch),
            batch_jobs=_positive_int(env, "ITSD_BATCH_JOBS", cls.batch_jobs),
            connect_timeout=float(_positive_int(env, "ITSD_CONNECT_TIMEOUT", int(cls.connect_timeout))),
            bf16_min_psnr=_positive_float(env, "ITSD_BF16_MIN_PSNR", cls.bf16_min_psnr),
            int8_min_psnr=_positive_float(env, "ITSD_INT8_MIN_PSNR", cls.int8_min_psnr),
            warm_up_timeout=float(_positive_int(env, "ITSD_WARM_UP_TIMEOUT", int(cls.warm_up_timeout))),
            celery_events=_flag(env, "ITSD_CELERY_EVENTS"),
            access=Access(
                parse_roots(env.get("ITSD_INPUT_ROOTS", "")),
                parse_roots(env.get("ITSD_OUTPUT_ROOTS", "")),
                tuple(s.strip().lower() for s in env["ITSD_URL_SCHEMES"].split(",") if s.strip())
                if env.get("ITSD_URL_SCHEMES")
                else default_schemes(),
            ),
        )
