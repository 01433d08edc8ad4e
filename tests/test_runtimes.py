"""Runtimes and precision (worker/runtimes.py, worker/openvino_runtime.py): OpenVINO over the same ONNX
artifacts as ONNX Runtime, bf16 only past its gate, compiled graphs cached on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo
from PIL import Image

from core.edit import Tiling, edit_image
from core.errors import InvalidParameters
from core.images import psnr
from core.params import EditParams
from core.settings import Settings
from producer.cli import itsd
from worker import runtimes
from worker.openvino_runtime import OpenVinoEditPipeline
from worker.pipeline import OnnxEditPipeline

PARAMS = EditParams(steps=3, seed=4)


def test_auto_picks_openvino_on_an_x86_cpu_that_has_it_and_onnxruntime_where_a_gpu_is(monkeypatch):
    monkeypatch.setattr(runtimes.platform, "machine", lambda: "x86_64")
    assert runtimes.choose_runtime("auto", ("CPUExecutionProvider",)) == "openvino"
    monkeypatch.setattr(runtimes, "_gpu_provider_usable", lambda providers: True)
    assert runtimes.choose_runtime("auto", ("CUDAExecutionProvider",)) == "onnxruntime"
    monkeypatch.setattr(runtimes, "_gpu_provider_usable", lambda providers: False)
    monkeypatch.setattr(runtimes.platform, "machine", lambda: "aarch64")
    assert runtimes.choose_runtime("auto", ()) == "onnxruntime"
    monkeypatch.setattr(runtimes, "openvino_installed", lambda: False)
    monkeypatch.setattr(runtimes.platform, "machine", lambda: "x86_64")
    assert runtimes.choose_runtime("auto", ()) == "onnxruntime"
    with pytest.raises(InvalidParameters, match=r"pip install 'itsd\[openvino\]'"):
        runtimes.choose_runtime("openvino", ())


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(runtimes, "native_bf16", lambda: native)
    assert runtimes.choose_precision("auto", "openvino") == expected
    assert runtimes.choose_precision("auto", "onnxruntime") == "fp32"
    with pytest.raises(InvalidParameters, match="--runtime openvino"):
        runtimes.choose_precision("bf16", "onnxruntime")


def test_openvino_in_fp32_matches_onnxruntime_on_a_tiled_image(tiny_artifacts, tmp_path):
    onnx = OnnxEditPipeline(tiny_artifacts)
    side = onnx.facts.tile_size
    image = photo(side * 2, side * 3 // 2, seed=2)  # 3 x 2 tiles, in batches of 2 (the last one padded)
    reference = edit_image(onnx, image, "Derain", PARAMS, Tiling(batch=2))
    pipeline = OpenVinoEditPipeline(tiny_artifacts, "fp32", tmp_path)
    edited = edit_image(pipeline, image, "Derain", PARAMS, Tiling(batch=2))
    assert edited.tiles == reference.tiles == 6
    assert (onnx.label, pipeline.label) == ("onnxruntime CPUExecutionProvider", "openvino fp32")
    assert psnr(np.asarray(edited.image), np.asarray(reference.image)) >= 60


def test_compiled_graphs_are_cached_on_disk_and_a_second_load_compiles_nothing_new(tiny_artifacts, tmp_path):
    image = photo(64, 64)
    edit_image(OpenVinoEditPipeline(tiny_artifacts, "fp32", tmp_path), image, "x", PARAMS)
    cached = sorted(p.name for p in (tmp_path / "openvino").iterdir())
    assert len(cached) >= 4  # one compiled blob per graph and shape
    edit_image(OpenVinoEditPipeline(tiny_artifacts, "fp32", tmp_path), image, "x", PARAMS)
    assert sorted(p.name for p in (tmp_path / "openvino").iterdir()) == cached


def test_bf16_runs_only_within_its_measured_bar_and_the_measurement_is_kept(tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "probe_psnr", lambda *_: 41.5)  # the gate's logic, whatever this CPU measures
    refused = runtimes.gated_bf16(tiny_artifacts, Settings(cache_dir=tmp_path / "a", bf16_min_psnr=42))
    assert refused.precision == "fp32"  # bf16 drifts more than 42 dB allows: the model runs in fp32
    (record,) = (tmp_path / "a" / "openvino").glob("*.bf16.json")
    assert json.loads(record.read_text())["psnr_db"] == 41.5
    monkeypatch.setattr(runtimes, "probe_psnr", lambda *_: pytest.fail("measured again"))
    kept = runtimes.gated_bf16(tiny_artifacts, Settings(cache_dir=tmp_path / "a", bf16_min_psnr=41))
    assert kept.precision == "bf16"


def test_the_bf16_probe_measures_drift_where_the_cpu_has_bf16_and_none_where_it_runs_the_hint_in_fp32(
    tiny_artifacts, tmp_path
):
    fp32, bf16 = (OpenVinoEditPipeline(tiny_artifacts, p, tmp_path) for p in ("fp32", "bf16"))
    measured = runtimes.probe_psnr(fp32, bf16)
    if runtimes.native_bf16():
        assert 30 < measured < 99  # bf16 kernels round: a little drift, well within the default bar
    else:
        assert measured == float("inf")  # OpenVINO computes the bf16 hint in fp32 here: the same pixels


def test_itsd_edit_runs_on_openvino(tiny_artifacts, tmp_path):
    photo(80, 64).save(tmp_path / "a.png")
    args = ["edit", str(tmp_path / "a.png"), "-m", str(tiny_artifacts), "-i", "Derain", "-o", str(tmp_path / "out")]
    run = CliRunner().invoke(itsd, [*args, "--runtime", "openvino", "--precision", "fp32", "--steps", "2", "-q"])
    assert run.exit_code == 0, run.output
    assert Image.open(tmp_path / "out" / "a.png").size == (80, 64)


def test_a_worker_asked_for_bf16_on_onnxruntime_stops_before_loading_anything(tiny_artifacts):
    args = ["worker", "-m", f"a={tiny_artifacts}", "--runtime", "onnxruntime", "--precision", "bf16"]
    run = CliRunner().invoke(itsd, args, env={"ITSD_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert run.exit_code == 1 and "bf16 runs on the openvino runtime: add --runtime openvino" in run.output
