"""The shared contract: parameters, jobs and results as strict JSON, manifests, input expansion."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest
from PIL import Image

from core.errors import InputNotFound, InvalidModel, InvalidParameters, PermanentError, SchemaError, TransientError
from core.inputs import expand, safe_relative
from core.job import Job, Result, job_id_for
from core.manifest import COMPONENTS, Manifest
from core.params import EDIT_DEFAULTS_FILE, EditParams, check_edit_defaults, read_edit_defaults
from core.settings import Settings


def test_defaults_are_the_blogs_inference_settings_at_the_inputs_own_size():
    params = EditParams().resolve({})
    assert (params.steps, params.guidance_scale, params.image_guidance_scale, params.max_side) == (20, 7.0, 1.5, None)
    assert params.guided


def test_a_model_may_ask_for_a_working_size_and_a_command_may_override_it():
    model = check_edit_defaults({"max_side": 256}, "ckpt/edit_defaults.json")
    assert EditParams().resolve(model).max_side == 256
    assert EditParams(max_side=1024).resolve(model).max_side == 1024


def test_unset_settings_come_from_the_model_and_set_ones_win():
    model = {"guidance_scale": 1.0, "image_guidance_scale": 1.2}
    assert EditParams(seed=4).resolve(model) == EditParams(20, 1.0, 1.2, seed=4, detail=1.0, guidance_until=1.0)
    assert EditParams(steps=3, guidance_scale=5.0).resolve(model) == EditParams(
        3, 5.0, 1.2, detail=1.0, guidance_until=1.0
    )
    with pytest.raises(ValueError, match="resolve"):
        _ = EditParams().guided  # a backend must never guess


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"guidance_scale": 1.0, "strength": 0.5}, "unknown edit default.*strength"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"guidance_scale": "7"}, "guidance_scale must be a number"),
        ({"steps": 0}, "steps must be 1..1000"),
        ({"max_side": 255.5}, "max_side must be an integer"),
        ({"max_side": 16}, "max_side must be 64"),
        ({"guidance_until": 1.5}, "guidance_until must be 0..1"),
        ({"scheduler": "plms"}, "unknown scheduler 'plms'"),
        ([1.0], "must be a JSON object"),
    ],
)
def test_a_models_bad_edit_defaults_are_refused_by_name(data, reason):
    with pytest.raises(InvalidModel, match=reason):
        check_edit_defaults(data, "ckpt/edit_defaults.json")


def test_a_fast_models_defaults_carry_its_sampler_and_guidance_cutoff():
    model = check_edit_defaults({"steps": 4, "scheduler": "euler", "guidance_until": 0.5}, "ckpt/edit_defaults.json")
    resolved = EditParams().resolve(model)
    assert (resolved.steps, resolved.scheduler, resolved.guidance_until) == (4, "euler", 0.5)
    assert EditParams(scheduler="ddim", guidance_until=1.0).resolve(model).scheduler == "ddim"
    assert EditParams().resolve({}).scheduler is None  # the checkpoint's own sampler


def test_edit_defaults_file_is_optional_and_checked(tmp_path):
    assert read_edit_defaults(tmp_path) == {}
    (tmp_path / EDIT_DEFAULTS_FILE).write_text('{"steps": 4, "image_guidance_scale": 1}')
    assert read_edit_defaults(tmp_path) == {"steps": 4, "image_guidance_scale": 1}
    (tmp_path / EDIT_DEFAULTS_FILE).write_text("{steps: 4")
    with pytest.raises(InvalidModel, match="unreadable"):
        read_edit_defaults(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"steps": 0}, "steps must be 1..1000"),
        ({"guidance_scale": -1}, "guidance_scale must be 0..100"),
        ({"image_guidance_scale": 1e308}, "image_guidance_scale must be 0..100"),  # overflowed to NaN on a worker
        ({"seed": 2**63}, "seed must be 0..9223372036854775807"),
        ({"seed": 10**400}, "seed must be 0..9223372036854775807"),  # too large for a float: no OverflowError
        ({"scheduler": "plms"}, "unknown scheduler"),
        ({"max_side": 32}, "max_side must be 64"),
        ({"seed": -1}, "seed must be 0.."),
        ({"guidance_scale": float("inf")}, "guidance_scale must be finite"),
        ({"image_guidance_scale": float("nan")}, "image_guidance_scale must be finite"),
        ({"guidance_scale": "7"}, "guidance_scale must be a number"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"max_side": 100.5}, "max_side must be an integer"),
        ({"scheduler": 5}, "scheduler must be a name"),
        ({"metadata": "gps"}, "metadata must be one of all, no-gps, none"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(kwargs, reason):
    with pytest.raises(InvalidParameters, match=reason):
        EditParams(**kwargs)


@pytest.mark.parametrize(("value", "reason"), [("inf", "0<=x<=100"), ("nan", "must be finite"), ("1e308", "0<=x<=100")])
def test_a_non_finite_or_overflowing_guidance_on_the_command_line_is_refused_not_run(value, reason, tmp_path):
    from click.testing import CliRunner

    from producer.cli import itsd

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = ["edit", str(tmp_path / "a.png"), "-m", str(tmp_path), "-i", "x", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(itsd, [*args, "--guidance-scale", value])
    assert result.exit_code == 2 and reason in result.output and "guidance" in result.output, result.output


def test_guidance_is_off_exactly_when_diffusers_turns_it_off():
    assert not EditParams(guidance_scale=1.0).resolve({}).guided
    assert not EditParams(image_guidance_scale=0.9).resolve({}).guided
    assert EditParams(guidance_scale=1.01, image_guidance_scale=1.0).guided


def test_errors_say_whether_to_retry():
    assert not InvalidParameters("x").retryable and isinstance(InvalidModel("x"), PermanentError)
    assert TransientError("x").retryable


def test_a_job_survives_json_and_refuses_unknown_fields():
    job = Job("j1", "b1", "cartoon", "Cartoonize", EditParams(seed=3), "out/a.jpg", input_uri="in/a.jpg")
    wire = json.dumps(job.to_dict())
    assert Job.from_dict(json.loads(wire)) == job
    with pytest.raises(SchemaError, match="unknown"):
        Job.from_dict({**job.to_dict(), "pickle": "x"})
    with pytest.raises(SchemaError, match="version"):
        Job.from_dict({**job.to_dict(), "schema_version": 99})


def test_a_result_survives_json():
    result = Result("j1", "failed", error_type="invalid_image", error_message="cannot decode", timings={"unet": 1.5})
    assert Result.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_job_ids_change_with_anything_that_changes_the_output_or_where_it_goes():
    base = job_id_for("abc", "Cartoonize", EditParams(seed=1), "m1", "a.png")
    assert base == job_id_for("abc", "Cartoonize", EditParams(seed=1), "m1", "a.png")
    others = {
        job_id_for("abd", "Cartoonize", EditParams(seed=1), "m1", "a.png"),
        job_id_for("abc", "Derain", EditParams(seed=1), "m1", "a.png"),
        job_id_for("abc", "Cartoonize", EditParams(seed=2), "m1", "a.png"),
        job_id_for("abc", "Cartoonize", EditParams(seed=1), "m2", "a.png"),
        job_id_for("abc", "Cartoonize", EditParams(seed=1), "m1", "copy/a.png"),  # the same bytes elsewhere
        job_id_for("abc", "Cartoonize", EditParams(seed=1, guidance_until=0.4), "m1", "a.png"),
        job_id_for("abc", "Cartoonize", EditParams(seed=1, metadata="no-gps"), "m1", "a.png"),
        job_id_for("abc", "Cartoonize", EditParams(seed=1, metadata="none"), "m1", "a.png"),
    }
    assert len(others | {base}) == 9


def test_a_job_that_keeps_the_photos_metadata_has_the_id_and_json_it_had_before_the_strip_options():
    params = EditParams(seed=1)  # what every job was before --strip-gps and --strip-metadata
    assert "metadata" not in params.to_dict() and EditParams.from_dict(params.to_dict()) == params
    assert job_id_for("abc", "Cartoonize", params, "m1", "a.png") == "14e533b42737946064d995b6328eda19"
    stripped = EditParams(seed=1, metadata="no-gps")
    assert EditParams.from_dict(json.loads(json.dumps(stripped.to_dict()))) == stripped


def test_settings_read_the_environment():
    settings = Settings.from_env(
        {
            "ITSD_BROKER_URL": "rediss://:pw@h:6380/0",
            "ITSD_PROVIDERS": "CUDAExecutionProvider, CPUExecutionProvider",
            "ITSD_MAX_PIXELS": "1000",
            "ITSD_CACHE_DIR": "/tmp/c",
        }
    )
    assert settings.broker_url == "rediss://:pw@h:6380/0"
    assert settings.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert (settings.max_pixels, settings.cache_dir) == (1000, Path("/tmp/c"))


@pytest.mark.parametrize("value", ["lots", "-5", "0", "1e6"])
def test_a_malformed_setting_is_a_clear_error(value):
    with pytest.raises(InvalidParameters, match="ITSD_MAX_PIXELS"):
        Settings.from_env({"ITSD_MAX_PIXELS": value})


def test_every_component_declares_its_dynamic_axes():
    unet = COMPONENTS["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].dynamic_axes == {0: "batch", 1: "unet_in_channels", 2: "latent_height", 3: "latent_width"}


def test_a_components_tensorrt_profile_is_its_declared_shapes_at_its_batch_and_side_bounds():
    from core.manifest import TRT_SIDE

    dims = {"unet_in_channels": 8, "latent_channels": 4, "hidden": 768, "sequence": 77}
    unet = COMPONENTS["unet"].trt_profile(dims, vae_scale=8, side=TRT_SIDE)
    assert unet["sample"] == {"min": [1, 8, 8, 8], "opt": [3, 8, 64, 64], "max": [12, 8, 128, 128]}
    assert unet["timestep"] == {"min": [1], "opt": [3], "max": [12]}
    assert unet["encoder_hidden_states"]["max"] == [12, 77, 768]
    text = COMPONENTS["text_encoder"].trt_profile(dims, vae_scale=8, side=TRT_SIDE)
    assert text == {"input_ids": {"min": [1, 77], "opt": [2, 77], "max": [2, 77]}}
    decoder = COMPONENTS["vae_decoder"].trt_profile(dims, vae_scale=8, side={"min": 64, "opt": 256, "max": 512})
    assert decoder["latent"] == {"min": [1, 4, 8, 8], "opt": [1, 4, 32, 32], "max": [1, 4, 64, 64]}
    assert [name for name, c in COMPONENTS.items() if not c.always_fp32] == ["unet"]


def test_a_folder_without_a_manifest_is_not_an_artifact_folder(tmp_path):
    with pytest.raises(InvalidModel, match="not an itsd artifact folder"):
        Manifest.read(tmp_path)
    with pytest.raises(InvalidModel, match="no such"):
        Manifest.read(tmp_path / "missing")


def test_inputs_mirror_folder_structure_and_accept_globs(tmp_path):
    for name in ["photos/2019/a.jpg", "photos/b.png", "photos/notes.txt", "photos/.hidden/c.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    folder, _ = expand([str(tmp_path / "photos")])
    assert sorted(str(i.relative) for i in folder) == ["2019/a.jpg", "b.png"]
    globbed, _ = expand([str(tmp_path / "photos" / "**" / "*.jpg")])
    assert [str(i.relative) for i in globbed] == ["2019/a.jpg"]
    single, _ = expand([str(tmp_path / "photos" / "b.png"), str(tmp_path / "photos" / "b.png")])
    assert [str(i.relative) for i in single] == ["b.png"]


def test_missing_inputs_and_colliding_names_are_errors(tmp_path):
    with pytest.raises(InputNotFound):
        expand([str(tmp_path / "nope")])
    with pytest.raises(InputNotFound):
        expand([str(tmp_path / "*.png")])
    for name in ["x/a.png", "y/a.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(InvalidParameters, match="both be written"):
        expand([str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "a.png")])


@pytest.mark.parametrize("bad", ["../escape.png", "/etc/passwd", "a/../../b.png", "", "."])
def test_output_keys_cannot_escape_the_destination(bad):
    with pytest.raises(InvalidParameters):
        safe_relative(bad)
    assert safe_relative("a/b.png") == PurePosixPath("a/b.png")


def test_atomic_writes_leave_no_temporary_and_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    from core.storage import usual_mode, write_atomic

    write_atomic(tmp_path / "a" / "b.png", b"data")
    assert (tmp_path / "a" / "b.png").read_bytes() == b"data"
    assert os.listdir(tmp_path / "a") == ["b.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a" / "b.png").stat().st_mode) == 0o666 & ~umask == usual_mode()
