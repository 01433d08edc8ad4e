"""One error root with short branches. The branch decides what a worker does: retry or give up.

`PermanentError`: the same job would fail again (bad image, bad parameters, a model that is not one).
`TransientError`: the job may succeed later or elsewhere (out of memory, provider fault, storage timeout).
Each class carries a short `code` that results and logs use instead of Python class paths.
"""

from __future__ import annotations


class ItsdError(Exception):
    code = "error"
    retryable = False


class PermanentError(ItsdError):
    code = "permanent"


class TransientError(ItsdError):
    code = "transient"
    retryable = True


class InvalidImage(PermanentError):
    """The bytes are not a decodable image."""

    code = "invalid_image"


class ImageTooLarge(PermanentError):
    code = "image_too_large"


class InvalidParameters(PermanentError):
    code = "invalid_parameters"


class InputNotFound(PermanentError):
    code = "input_not_found"


class InvalidModel(PermanentError):
    """A checkpoint or artifact folder that is missing, incomplete or of the wrong kind."""

    code = "invalid_model"


class ModelMismatch(InvalidModel):
    """A batch made with one model identity meets another under the same name: a worker whose artifacts differ
    from its batch's pin, or a resubmit after the model was replaced. Never computed: results would mix."""

    code = "model_mismatch"


class ExportFailed(PermanentError):
    code = "export_failed"


class ParityError(ExportFailed):
    """An export whose outputs differ from the PyTorch pipeline by more than its tolerance."""

    code = "parity"


class OutsideRoots(PermanentError):
    """A job names a local path outside the worker's declared roots, or a URL scheme it does not allow."""

    code = "outside_roots"


class InvalidOutput(PermanentError):
    """The model's output is not an image (NaN or infinite values: broken weights, an overflowing fp16 graph)."""

    code = "invalid_output"


class WarmUpFailed(ItsdError):
    """No model a worker was asked to serve could load and run one edit: the worker does not start."""

    code = "warm_up"


class BrokerUnreachable(ItsdError):
    """Redis cannot be used at all: refused, unknown host, a wrong or missing password, no answer in time."""

    code = "broker"


class LocalProcessFailed(ItsdError):
    """A process `itsd run` starts on this machine could not: redis-server not installed, or it or a local
    worker exited or stayed silent at start."""

    code = "local_process"


class BrokerAuthError(BrokerUnreachable):
    """Redis answered, but refused the password or wants one: waiting will not help."""


class SchemaError(PermanentError):
    """A job, result or manifest that does not match the schema this version reads."""

    code = "schema"


class ProviderError(TransientError):
    """The execution provider failed at run time (driver fault, out of device memory)."""

    code = "provider"


class ModelUnavailable(TransientError):
    """This worker process could not warm the model up; another worker (or a later attempt) may run the job."""

    code = "model_unavailable"


class StorageError(TransientError):
    """Storage failed in a way that may heal: a full disk, a timeout, an I/O error, a store that is down."""

    code = "storage"


class StorageRefused(PermanentError):
    """Storage refused in a way waiting cannot heal: read-only, permission denied, a file where a folder
    should be, a missing bucket."""

    code = "storage_refused"


class OutOfMemory(TransientError):
    """Host or device memory ran out; another attempt (or another worker) may fit."""

    code = "out_of_memory"
