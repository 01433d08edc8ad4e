"""The worker's job handling (worker/jobs.py) against a real redis-server, with a stand-in model."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from core.access import Access
from core.errors import ModelUnavailable, ProviderError, StorageError, StorageRefused
from core.images import encode_image
from core.job import Job, job_id_for
from core.params import EditParams
from core.queue import queue_for
from core.records import Keys, forget_results, record_result, status_counts
from core.redis_url import redact, redis_client
from core.settings import Settings
from core.standin import StandInModel
from core.storage import storage_error
from producer.local import RedisServer
from worker.claims import Claim, owner_is_dead
from worker.jobs import EditService, ModelSpec


class Invert(StandInModel):
    """A stand-in model: inverts the image, optionally slowly or failing with a transient error."""

    def __init__(self, delay: float = 0.0, failures: int = 0) -> None:
        super().__init__(transform=np.negative, on_image=self._called)
        self.delay, self.failures, self.calls = delay, failures, 0

    def _called(self) -> None:
        self.calls += 1
        time.sleep(self.delay)
        if self.calls <= self.failures:
            raise ProviderError("device lost")


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as server:
        yield server


@pytest.fixture
def client(redis):
    client = redis_client(redis.url)
    client.flushdb()
    return client


TMP = Path(tempfile.gettempdir()).resolve()  # where every test's files are: the stand-in workers' roots


def service(client, backend: Invert, **settings) -> EditService:
    spec = ModelSpec("m", "model-1", "stand-in", lambda: backend)
    access = settings.pop("access", Access((TMP,), (TMP,)))
    return EditService({"m": spec}, client, Settings(claim_ttl=2, access=access, **settings))


def make_job(tmp_path: Path, name: str = "a.png", data: bytes | None = None, **fields) -> Job:
    source = tmp_path / "in" / name
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(encode_image(photo(64, 64), name) if data is None else data)
    params = EditParams(steps=1, seed=0, max_side=64)
    job_id = job_id_for(name, "invert", params, "m", name)
    return Job(
        job_id,
        "batch1",
        "m",
        "invert",
        params,
        str(tmp_path / "out" / name),
        input_uri=str(source),
        **fields,
    )


def test_a_job_writes_its_output_and_records_a_done_result(client, tmp_path):
    job = make_job(tmp_path)
    result = service(client, Invert()).handle(job.to_dict(), retries=0, worker="w")
    assert result["status"] == "done" and result["attempts"] == 1 and result["width"] == 64
    assert Path(job.output_uri).is_file() and result["size_bytes"] == Path(job.output_uri).stat().st_size
    assert status_counts(client, Keys("batch1"))["done"] == 1
    assert {"read", "decode", "edit", "encode", "write"} <= set(result["timings"])


def test_a_transparent_photo_with_a_colour_profile_keeps_both_through_a_job(client, tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgba = photo(64, 64).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 64)))
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG", icc_profile=icc)
    job = make_job(tmp_path, "logo.png", data=buffer.getvalue())
    assert service(client, Invert()).handle(job.to_dict(), retries=0, worker="w")["status"] == "done"
    out = Image.open(job.output_uri)
    assert out.mode == "RGBA" and out.info["icc_profile"] == icc
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(rgba.getchannel("A")))


def test_the_result_names_the_runtime_that_ran_the_model(client, tmp_path):
    backend = Invert()
    backend.label = "openvino bf16"
    assert service(client, backend).handle(make_job(tmp_path).to_dict(), 0, "w")["runtime"] == "openvino bf16"


def test_a_large_image_is_edited_at_its_own_size_in_tiles_and_the_result_records_them(client, tmp_path):
    image = photo(150, 100, seed=3)
    job = make_job(tmp_path, data=encode_image(image, "a.png"))
    job = Job.from_dict({**job.to_dict(), "params": EditParams(steps=1, seed=0).to_dict()})
    result = service(client, Invert()).handle(job.to_dict(), retries=0, worker="w")
    assert result["status"] == "done" and (result["width"], result["height"]) == (150, 100)
    assert (result["working_width"], result["working_height"]) == (150, 100)
    assert result["tiles"] == 12  # padded to 192 x 128 in the stand-in's 64-px tiles: 4 x 3
    inverted = 255 - np.asarray(image).astype(int)
    assert np.abs(np.asarray(Image.open(job.output_uri)).astype(int) - inverted).max() <= 1


def test_a_model_that_outputs_nan_fails_the_job_and_writes_nothing(client, tmp_path):
    job = make_job(tmp_path)
    broken = StandInModel(transform=lambda x: np.full_like(x, np.nan))
    result = service(client, broken).handle(job.to_dict(), retries=0, worker="w")
    assert (result["status"], result["error_type"]) == ("failed", "invalid_output")
    assert not Path(job.output_uri).exists()


def test_storage_that_cannot_heal_fails_the_job_at_once_without_a_retry(client, tmp_path, tmpfs):
    blocked = make_job(tmp_path)
    (tmp_path / "out").write_text("a file where the output folder should be")
    read_only = Job.from_dict({**blocked.to_dict(), "output_uri": str(tmpfs("ro", 2**16, read_only=True) / "a.png")})
    for job, reason in [(blocked, "a file is where its folder should be"), (read_only, "Read-only file system")]:
        result = service(client, Invert(), max_retries=5).handle(job.to_dict(), 0, "w")  # no TransientError raised
        assert (result["status"], result["error_type"], result["attempts"]) == ("failed", "storage_refused", 1)
        assert reason in result["error_message"]
        client.delete(Keys("batch1").attempts)


def test_a_full_disk_is_transient(client, tmp_path, tmpfs):
    disk = tmpfs("full", 2**16)
    (disk / "filler").write_bytes(b"x" * 2**16)
    job = Job.from_dict({**make_job(tmp_path).to_dict(), "output_uri": str(disk / "a.png")})
    with pytest.raises(StorageError, match="No space left"):
        service(client, Invert()).handle(job.to_dict(), 0, "w")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), StorageRefused),
        (PermissionError("Access Denied"), StorageRefused),  # as s3fs raises it, with no errno
        (OSError(errno.EROFS, "Read-only file system"), StorageRefused),
        (OSError(errno.ENOSPC, "No space left on device"), StorageError),
        (OSError(errno.EIO, "Input/output error"), StorageError),
        (TimeoutError("timed out"), StorageError),
    ],
)
def test_storage_errors_are_permanent_only_when_waiting_cannot_heal_them(exc, kind):
    assert type(storage_error("s3://b/a.png: cannot write", exc)) is kind


def test_a_job_whose_output_exists_is_skipped_unless_overwrite(client, tmp_path):
    job = make_job(tmp_path)
    Path(job.output_uri).parent.mkdir(parents=True)
    Path(job.output_uri).write_bytes(b"earlier")
    backend = Invert()
    assert service(client, backend).handle(job.to_dict(), 0, "w")["status"] == "skipped"
    assert backend.calls == 0 and Path(job.output_uri).read_bytes() == b"earlier"
    again = Job.from_dict({**job.to_dict(), "overwrite": True})
    assert service(client, backend).handle(again.to_dict(), 0, "w")["status"] == "done"
    assert Path(job.output_uri).read_bytes() != b"earlier"


def test_a_corrupt_image_fails_permanently_with_its_reason(client, tmp_path):
    job = make_job(tmp_path, "bad.jpg", data=b"not an image at all")
    result = service(client, Invert()).handle(job.to_dict(), 0, "w")
    assert result["status"] == "failed" and result["error_type"] == "invalid_image"
    assert "cannot decode" in result["error_message"]
    assert client.llen(Keys.dead) == 0  # permanent failures are not dead-lettered: nothing to retry


def test_a_job_pins_its_unpinned_batch_to_the_workers_model_and_its_result_records_the_identity(client, tmp_path):
    client.hset(Keys("batch1").batch, "total", 1)  # submitted before any worker served the model: unpinned
    result = service(client, Invert()).handle(make_job(tmp_path).to_dict(), 0, "w")
    assert result["status"] == "done" and result["model_id"] == "model-1"
    assert client.hget(Keys("batch1").batch, "model_id") == b"model-1"


def test_a_job_of_a_batch_pinned_to_another_model_identity_fails_without_running(client, tmp_path):
    client.hset(Keys("batch1").batch, mapping={"total": 1, "model_id": "model-2"})
    job, model = make_job(tmp_path), Invert()
    result = service(client, model).handle(job.to_dict(), 0, "w")
    assert result["status"] == "failed" and result["error_type"] == "model_mismatch"
    assert "batch pinned to model m model-2; this worker serves model-1" in result["error_message"]
    assert model.calls == 0 and not Path(job.output_uri).exists() and result["model_id"] is None
    assert client.hget(Keys("batch1").batch, "model_id") == b"model-2"  # the pin stays


def test_transient_errors_are_raised_for_retry_then_dead_lettered_with_the_payload(client, tmp_path):
    job = make_job(tmp_path)
    svc = service(client, Invert(failures=10), max_retries=2)
    for retries in (0, 1):
        with pytest.raises(ProviderError):
            svc.handle(job.to_dict(), retries, "w")
    result = svc.handle(job.to_dict(), 2, "w")
    assert result["status"] == "failed" and result["error_type"] == "provider" and result["attempts"] == 3
    entry = json.loads(client.lindex(Keys.dead, 0))
    assert entry["job"] == job.to_dict() and entry["attempts"] == 3
    assert client.get(Keys.claim(job.job_id)) is None  # the claim is released on every path


def test_a_model_that_fails_its_warm_up_in_a_process_sends_its_jobs_back_for_another_worker(client, tmp_path):
    job = make_job(tmp_path)
    broken = StandInModel(transform=lambda x: np.full_like(x, np.nan))
    svc = service(client, broken, max_retries=1)
    svc.warm_up()  # logs why, and does not raise: the process serves its other models
    assert svc.unavailable["m"].startswith("InvalidOutput: ")
    with pytest.raises(ModelUnavailable, match="failed its warm-up on this worker"):
        svc.handle(job.to_dict(), 0, "w")  # retried: the next attempt may go to a worker that can run it
    result = svc.handle(job.to_dict(), 1, "w")
    assert (result["status"], result["error_type"]) == ("failed", "model_unavailable")  # never waits forever


def test_a_cancelled_batch_records_its_jobs_as_cancelled_without_running_them(client, tmp_path):
    job = make_job(tmp_path)
    client.hset(Keys("batch1").batch, "cancelled", 1)
    backend = Invert()
    assert service(client, backend).handle(job.to_dict(), 0, "w")["status"] == "cancelled"
    assert backend.calls == 0 and not Path(job.output_uri).exists()


def test_a_malformed_payload_is_refused_and_dead_lettered(client):
    result = service(client, Invert()).handle({"job_id": "j", "schema_version": 99}, 0, "w")
    assert result["status"] == "failed" and result["error_type"] == "schema"
    assert json.loads(client.lindex(Keys.dead, 0))["job"]["job_id"] == "j"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"instruction": 5}, "job field instruction must be str, got 5"),
        ({"output_uri": 5}, "job field output_uri must be str or null"),
        ({"overwrite": "yes"}, "job field overwrite must be bool"),
        ({"job_id": None}, "job field job_id must be str"),
        ({"params": {"seed": 1.5}}, "seed must be an integer"),
        ({"params": {"steps": 1.5}}, "steps must be an integer"),
        ({"params": {"max_side": 100.5}}, "max_side must be an integer"),
        ({"params": {"guidance_scale": float("nan")}}, "guidance_scale must be finite"),
    ],
)
def test_a_payload_with_a_field_of_the_wrong_type_is_dead_lettered_naming_the_field(client, tmp_path, change, reason):
    payload = {**make_job(tmp_path).to_dict(), **change}
    result = service(client, Invert()).handle(payload, 0, "w")
    assert (result["status"], result["error_type"]) == ("failed", "schema") and reason in result["error_message"]
    assert reason in json.loads(client.lindex(Keys.dead, 0))["error_message"]


@pytest.mark.parametrize("payload", ["a string", [1, 2], 5, None])
def test_a_payload_that_is_no_object_is_dead_lettered(client, payload):
    result = service(client, Invert()).handle(payload, 0, "w")
    assert (result["status"], result["error_type"]) == ("failed", "schema")
    assert "job must be a JSON object" in result["error_message"]
    assert json.loads(client.lindex(Keys.dead, 0))["job"] == {"raw": repr(payload)}


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ({"output_uri": "/etc/itsd-test.png"}, "outside this worker's output roots"),
        ({"input_uri": "/etc/hostname", "output_uri": None}, "outside this worker's input roots"),  # read back inline
        ({"output_uri": "{tmp}/../../etc/itsd-test.png"}, "outside this worker's output roots"),
        ({"output_uri": "{tmp}/link/itsd-test.png"}, "outside this worker's output roots"),  # a symlink out
        ({"input_uri": "ftp://example.invalid/a.png"}, "ftp:// is not allowed"),
        ({"input_uri": "in/a.png"}, "a relative path"),
    ],
)
def test_a_job_outside_the_workers_roots_fails_at_once_naming_them_and_touches_nothing(client, tmp_path, where, reason):
    (tmp_path / "link").symlink_to("/etc")
    job = make_job(tmp_path)
    payload = {**job.to_dict(), **{k: v and v.format(tmp=tmp_path) for k, v in where.items()}}
    backend = Invert()
    result = service(client, backend, access=Access((tmp_path / "in",), (tmp_path / "out",))).handle(payload, 0, "w")
    assert (result["status"], result["error_type"]) == ("failed", "outside_roots") and reason in result["error_message"]
    assert backend.calls == 0 and not Path("/etc/itsd-test.png").exists()


def test_a_worker_without_roots_says_how_to_declare_them(client, tmp_path):
    result = service(client, Invert(), access=Access()).handle(make_job(tmp_path).to_dict(), 0, "w")
    assert result["error_type"] == "outside_roots" and "declare them with ITSD_INPUT_ROOTS" in result["error_message"]


def test_a_redelivered_job_waits_for_the_running_copy_instead_of_computing_twice(client, tmp_path):
    job = make_job(tmp_path)
    slow, duplicate = Invert(delay=1.5), Invert()
    first = threading.Thread(target=service(client, slow).handle, args=(job.to_dict(), 0, "w1"))
    first.start()
    while client.get(Keys.claim(job.job_id)) is None:
        time.sleep(0.01)
    result = service(client, duplicate).handle(job.to_dict(), 0, "w2")
    first.join()
    assert result["status"] == "skipped" and duplicate.calls == 0 and slow.calls == 1
    stored = json.loads(client.hget(Keys("batch1").results, job.job_id))
    assert stored["status"] == "done" and stored["worker"] == "w1"  # the skip did not hide the done result
    assert status_counts(client, Keys("batch1")) == {"done": 1, "skipped": 0, "failed": 0, "cancelled": 0}


def test_a_claim_left_by_a_dead_process_on_this_host_is_taken_over_at_once(client):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from worker.claims import HOST

    owner = f"{HOST}:{dead.stdout.strip()}:dead"
    client.set(Keys.claim("j"), owner, px=60_000)
    assert owner_is_dead(owner) and not owner_is_dead(f"elsewhere:{dead.stdout.strip()}:x")
    claim = Claim(client, "j", ttl=5)
    assert claim.try_acquire() and client.get(Keys.claim("j")).decode() == claim.owner


def test_a_held_claim_is_renewed_while_the_job_runs(client):
    claim = Claim(client, "j", ttl=1)
    assert claim.try_acquire()
    with claim:
        time.sleep(2.5)  # past the TTL: only renewal keeps it
        assert client.get(Keys.claim("j")).decode() == claim.owner
    assert client.get(Keys.claim("j")) is None


def test_counts_follow_results_when_one_is_replaced_or_forgotten(client):
    keys = Keys("b")
    record_result(client, keys, {"job_id": "j", "status": "failed"}, 60)
    record_result(client, keys, {"job_id": "j", "status": "skipped"}, 60, first=True)  # kept: one exists
    assert status_counts(client, keys)["failed"] == 1
    record_result(client, keys, {"job_id": "j", "status": "done"}, 60)
    assert status_counts(client, keys) == {"done": 1, "skipped": 0, "failed": 0, "cancelled": 0}
    forget_results(client, keys, ["j"])
    assert sum(status_counts(client, keys).values()) == 0 and client.hlen(keys.results) == 0


def test_queue_names_and_urls_are_checked_and_passwords_redacted():
    assert queue_for("cartoon") == "itsd.cartoon"
    with pytest.raises(Exception, match="model name"):
        queue_for("bad name!")
    assert redact("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"


def test_rediss_urls_check_certificates_unless_told_otherwise():
    import ssl

    from core.queue import celery_config
    from core.redis_url import tls_options

    assert tls_options("redis://h:6379/0") is None
    assert tls_options("rediss://h:6379/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    options = tls_options("rediss://h/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem")
    assert options == {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_ca_certs": "/ca.pem"}
    config = celery_config("rediss://:pw@h/0", Settings())
    assert config["broker_use_ssl"] == config["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    with pytest.raises(Exception, match="ssl_cert_reqs"):
        tls_options("rediss://h/0?ssl_cert_reqs=maybe")


def test_celery_settings_make_jobs_safe_to_redeliver():
    from core.queue import celery_config

    config = celery_config("redis://h/0", Settings(visibility_timeout=900))
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    for options in ("broker_transport_options", "result_backend_transport_options"):
        assert config[options]["visibility_timeout"] == 900
