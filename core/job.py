"""Jobs and results: frozen dataclasses that travel as JSON (never pickle), with a schema version.

A job's id is a hash of everything that decides its output (input bytes, instruction, parameters and
the model's name) and of the output's key, so the same work submitted twice has the same id and can be
recognised as done, and two inputs with the same bytes at two paths are two jobs with two outputs. The
model's identity (its artifacts' `model_id`) is not in the id: a producer may submit before any worker has
loaded the model. It is the batch's pin instead (`core.records.pin_model`): the first worker to run one of
the batch's jobs pins the batch to the model it serves, a worker serving another refuses its jobs, and each
done result records the identity that made it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from core.errors import SchemaError
from core.params import EditParams

JOB_VERSION = 2  # 2: job ids from the model's name; the identity moved from the job to its batch's pin
Status = Literal["done", "skipped", "failed", "cancelled"]
FINAL_STATUSES = ("done", "skipped", "failed", "cancelled")


def job_id_for(input_digest: str, instruction: str, params: EditParams, model: str, output_key: str) -> str:
    """Deterministic id: sha256 over a canonical JSON of what determines the output, and where it goes. `model`
    is the model's name, known at submit whether or not a worker serves it yet."""
    canonical = json.dumps(
        {
            "input": input_digest,
            "instruction": instruction,
            "params": params.to_dict(),
            "model": model,
            "output": output_key,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _strict(cls: type, data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SchemaError(f"{what} must be a JSON object, got {type(data).__name__}")
    if data.get("schema_version") != JOB_VERSION:
        raise SchemaError(f"{what} schema version {data.get('schema_version')!r}; this itsd reads {JOB_VERSION}")
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise SchemaError(f"{what} has unknown field(s): {', '.join(sorted(unknown))}")
    return data


@dataclass(frozen=True)
class Job:
    job_id: str
    batch_id: str
    model: str  # the model's name; its queue is itsd.<model>
    instruction: str
    params: EditParams
    output_uri: str | None  # local path or fsspec URL; None: the output comes back inline, for `itsd collect`
    input_uri: str | None = None  # local path or fsspec URL
    input_b64: str | None = None  # small images inline instead of a URI
    overwrite: bool = False
    relative: str | None = None  # the output's key under the destination (also the inline output's name)
    submitted_at: float | None = None  # unix time, for submit-to-start latency
    schema_version: int = JOB_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": self.params.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        """A job from its JSON; a missing field or one of the wrong type is a SchemaError naming it."""
        data = _strict(cls, data, "job")
        for name, kinds in _JOB_FIELD_TYPES.items():
            if name not in data:
                if name in _JOB_REQUIRED:
                    raise SchemaError(f"job has no {name}")
                continue
            value = data[name]
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise SchemaError(f"job field {name} must be {expected}, got {value!r}"[:300])
        return cls(**{**data, "params": EditParams.from_dict(data["params"])})


_OPTIONAL_TEXT = (str, type(None))
_JOB_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "job_id": (str,),
    "batch_id": (str,),
    "model": (str,),
    "instruction": (str,),
    "params": (dict,),
    "output_uri": _OPTIONAL_TEXT,
    "input_uri": _OPTIONAL_TEXT,
    "input_b64": _OPTIONAL_TEXT,
    "overwrite": (bool,),
    "relative": _OPTIONAL_TEXT,
    "submitted_at": (int, float, type(None)),
    "schema_version": (int,),
}
_JOB_REQUIRED = ("job_id", "batch_id", "model", "instruction", "params", "output_uri")


@dataclass(frozen=True)
class Result:
    job_id: str
    status: Status
    output_uri: str | None = None
    width: int | None = None
    height: int | None = None
    size_bytes: int | None = None  # of the encoded output
    seed: int | None = None
    working_width: int | None = None  # the size the model worked at (the input's own unless max_side shrank it)
    working_height: int | None = None
    tiles: int | None = None  # UNet tiles per denoising step
    runtime: str | None = None  # what ran the model: "openvino bf16", "onnxruntime CUDAExecutionProvider", ...
    model_id: str | None = None  # of a done job: the identity of the model that made it (the batch's pin)
    batched_jobs: int | None = None  # with --batch-jobs: the most jobs that shared one of its UNet calls
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    worker: str | None = None
    attempts: int = 1  # deliveries of this job so far, retries and redeliveries included
    started_at: float | None = None  # unix times on the worker
    finished_at: float | None = None
    error_type: str | None = None  # an ItsdError code
    error_message: str | None = None
    schema_version: int = JOB_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        return cls(**_strict(cls, data, "result"))
