"""Execution providers: preference order, options, and fallbacks that are logged, never silent."""

from __future__ import annotations

import logging

import pytest

from core.errors import InvalidModel, InvalidParameters
from worker import providers


def test_unavailable_gpu_providers_fall_back_to_the_cpu_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(providers, "_reported", set())
    with caplog.at_level(logging.WARNING, logger="worker.providers"):
        chosen = providers.choose(("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    assert [name for name, _ in chosen] == ["CPUExecutionProvider"]  # this machine's onnxruntime has no GPU
    assert "TensorrtExecutionProvider" in caplog.text and "CUDAExecutionProvider" in caplog.text


def test_gpu_providers_get_the_device_and_tensorrt_its_profiles(monkeypatch):
    monkeypatch.setattr(
        providers.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    profile = {"sample": {"min": [1, 8, 8, 8], "opt": [3, 8, 64, 64], "max": [3, 8, 128, 128]}}
    chosen = dict(
        providers.choose(
            ("TensorrtExecutionProvider", "CUDAExecutionProvider"), device_id=2, trt_profile=profile, fp16=True
        )
    )
    assert chosen["CUDAExecutionProvider"] == {"device_id": 2}
    trt = chosen["TensorrtExecutionProvider"]
    assert trt["device_id"] == 2 and trt["trt_fp16_enable"] is True
    assert trt["trt_profile_opt_shapes"] == "sample:3x8x64x64"
    assert "CPUExecutionProvider" in chosen  # always the last resort


def test_an_unknown_provider_name_is_a_parameter_error():
    with pytest.raises(InvalidParameters, match="Cuda"):
        providers.choose(("Cuda",))


def test_a_corrupt_onnx_file_is_an_invalid_model(tmp_path):
    bad = tmp_path / "unet.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(InvalidModel, match="ONNX Runtime cannot load"):
        providers.session(bad, providers.choose(("CPUExecutionProvider",)))


def test_gpu_providers_the_default_order_names_are_a_debug_line_unless_the_user_asked_for_them(
    tiny_artifacts, caplog, monkeypatch
):
    """A CPU-only build lacks TensorRT and CUDA, which only the default order names: no warning on every load.
    Named in ITSD_PROVIDERS (or by --device cuda), their absence is worth one."""
    from worker.pipeline import OnnxEditPipeline

    monkeypatch.setattr(providers, "_reported", set())
    monkeypatch.delenv("ITSD_PROVIDERS")
    with caplog.at_level(logging.DEBUG, logger="worker.providers"):
        OnnxEditPipeline(tiny_artifacts)
    assert {r.levelno for r in caplog.records if "not in this onnxruntime build" in r.message} == {logging.DEBUG}
    caplog.clear()
    monkeypatch.setenv("ITSD_PROVIDERS", "CUDAExecutionProvider,CPUExecutionProvider")
    with caplog.at_level(logging.DEBUG, logger="worker.providers"):
        OnnxEditPipeline(tiny_artifacts)
    assert [r.levelno for r in caplog.records if "CUDAExecutionProvider" in r.message] == [logging.WARNING]
