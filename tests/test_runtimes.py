"""Runtimes and precision (worker/runtimes.py, worker/openvino_runtime.py, worker/int8.py): OpenVINO over the
same ONNX artifacts as ONNX Runtime, bf16 and int8 only past their gate, compiled graphs and the int8 UNet
cached on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
from worker import int8, runtimes
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


@pytest.mark.parametrize(
    ("native", "nncf", "expected"), [(True, True, "bf16"), (False, True, "int8"), (False, False, "fp32")]
)
def test_auto_precision_tries_bf16_where_native_else_int8_where_nncf_is_installed(monkeypatch, native, nncf, expected):
    monkeypatch.setattr(runtimes, "native_bf16", lambda: native)
    monkeypatch.setattr(runtimes, "nncf_installed", lambda: nncf)
    assert runtimes.choose_precision("auto", "openvino") == expected
    assert runtimes.choose_precision("auto", "onnxruntime") == "fp32"
    for precision in ("bf16", "int8"):
        with pytest.raises(
            InvalidParameters, match=f"{precision} runs on the openvino runtime: add --runtime openvino"
        ):
            runtimes.choose_precision(precision, "onnxruntime")
    if not nncf:
        with pytest.raises(InvalidParameters, match=r"int8 needs NNCF .*pip install 'itsd\[openvino\]'"):
            runtimes.choose_precision("int8", "openvino")


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


def gate_record(psnr_db: float, fp32_s: float, other_s: float, precision: str = "bf16") -> dict:
    return {"psnr_db": psnr_db, "unet_s": {"fp32": fp32_s, precision: other_s}, "probe": {}}


def test_bf16_runs_only_within_its_measured_bar_and_the_measurement_is_kept(tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(runtimes, "measure", lambda *_: gate_record(41.5, 2.0, 1.0))  # whatever this CPU measures
    refused = runtimes.gated(tiny_artifacts, "bf16", Settings(cache_dir=tmp_path / "a", bf16_min_psnr=42))
    assert refused.precision == "fp32"  # bf16 drifts more than 42 dB allows: the model runs in fp32
    (record,) = (tmp_path / "a" / "openvino").glob("*.bf16.json")
    assert json.loads(record.read_text())["psnr_db"] == 41.5
    monkeypatch.setattr(runtimes, "measure", lambda *_: pytest.fail("measured again"))
    kept = runtimes.gated(tiny_artifacts, "bf16", Settings(cache_dir=tmp_path / "a", bf16_min_psnr=41))
    assert kept.precision == "bf16"


def test_auto_takes_a_gated_precision_only_where_its_unet_call_measured_faster_than_fp32(
    tiny_artifacts, tmp_path, monkeypatch
):
    settings = Settings(cache_dir=tmp_path)
    monkeypatch.setattr(runtimes, "measure", lambda *_: gate_record(50.0, 1.0, 1 / 1.05))  # within the bar
    assert runtimes.gated(tiny_artifacts, "bf16", settings).precision == "bf16"  # asked for by name
    assert runtimes.gated(tiny_artifacts, "bf16", settings, auto=True).precision == "fp32"  # 1.05x: not worth it
    (record,) = (tmp_path / "openvino").glob("*.bf16.json")
    record.write_text(json.dumps(gate_record(50.0, 1.0, 0.5)))  # measured 2x as fast
    assert runtimes.gated(tiny_artifacts, "bf16", settings, auto=True).precision == "bf16"


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


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_worker_asked_for_bf16_or_int8_on_onnxruntime_stops_before_loading_anything(tiny_artifacts, precision):
    args = ["worker", "-m", f"a={tiny_artifacts}", "--runtime", "onnxruntime", "--precision", precision]
    run = CliRunner().invoke(itsd, args, env={"ITSD_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert run.exit_code == 1 and f"{precision} runs on the openvino runtime: add --runtime openvino" in run.output


def test_itsd_edit_with_int8_on_onnxruntime_says_what_to_do(tiny_artifacts, tmp_path):
    photo(64, 64).save(tmp_path / "a.png")
    args = ["edit", str(tmp_path / "a.png"), "-m", str(tiny_artifacts), "-i", "x", "-o", str(tmp_path / "out")]
    run = CliRunner().invoke(itsd, [*args, "--runtime", "onnxruntime", "--precision", "int8", "-q"])
    assert run.exit_code != 0 and "int8 runs on the openvino runtime: add --runtime openvino" in run.output


@pytest.fixture(scope="module")
def int8_cache(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ITSD_CACHE_DIR where the tiny model's UNet was compressed to int8 once (real NNCF, real OpenVINO)."""
    cache = tmp_path_factory.mktemp("int8-cache")
    OpenVinoEditPipeline(tiny_artifacts, "int8", cache)
    return cache


def test_int8_edits_and_a_second_load_reads_the_quantized_unet_from_disk(
    tiny_artifacts, int8_cache, tmp_path, monkeypatch
):
    (quantized,) = (int8_cache / "openvino").glob(f"*.unet.int8-{int8.settings_key()}.xml")
    written = quantized.stat().st_mtime_ns
    monkeypatch.setattr(int8.nncf, "compress_weights", lambda *_, **__: pytest.fail("compressed again"))
    pipeline = OpenVinoEditPipeline(tiny_artifacts, "int8", int8_cache)
    assert pipeline.label == "openvino int8" and pipeline.sources["unet"] == quantized
    image = photo(64, 64)
    edited = np.asarray(edit_image(pipeline, image, "Derain", PARAMS).image)
    reference = np.asarray(
        edit_image(OpenVinoEditPipeline(tiny_artifacts, "fp32", tmp_path), image, "Derain", PARAMS).image
    )
    assert 35 < psnr(edited, reference) < 99  # int8 weights round: within the default bar, not the same pixels
    assert quantized.stat().st_mtime_ns == written


def test_the_int8_gate_refuses_an_impossible_bar_in_one_warning_and_keeps_its_measurement(
    tiny_artifacts, int8_cache, monkeypatch, caplog
):
    monkeypatch.setattr(runtimes, "native_bf16", lambda: False)  # the fallback is fp32 here, whatever the CPU
    with caplog.at_level(logging.WARNING, logger="worker.runtimes"):
        refused = runtimes.gated(tiny_artifacts, "int8", Settings(cache_dir=int8_cache, int8_min_psnr=500))
    assert refused.precision == "fp32"
    (warning,) = caplog.records
    assert "int8 is" in warning.message and "under ITSD_INT8_MIN_PSNR (500): running fp32" in warning.message
    (record,) = (int8_cache / "openvino").glob("*.int8.json")
    kept = json.loads(record.read_text())
    assert 35 < kept["psnr_db"] < 99 and set(kept["unet_s"]) == {"fp32", "int8"}


def test_a_precision_auto_tried_and_its_gate_refused_is_an_info_line_not_a_warning(
    tiny_artifacts, int8_cache, monkeypatch, caplog
):
    """`auto` trying int8 (or bf16) and keeping fp32 is the choice working: no warning on every model load."""
    monkeypatch.setattr(runtimes, "native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="worker.runtimes"):
        kept = runtimes.gated(tiny_artifacts, "int8", Settings(cache_dir=int8_cache, int8_min_psnr=500), auto=True)
    assert kept.precision == "fp32"
    assert [r.levelno for r in caplog.records if "under ITSD_INT8_MIN_PSNR" in r.message] == [logging.INFO]


def test_auto_on_this_cpu_follows_the_gates_measurement(tiny_artifacts, int8_cache, monkeypatch):
    monkeypatch.setenv("ITSD_CACHE_DIR", str(int8_cache))
    settings = Settings.from_env()
    backend = runtimes.load_artifacts(tiny_artifacts, "openvino", "auto")
    if runtimes.native_bf16():
        assert backend.precision in ("bf16", "fp32")  # int8 is not tried where bf16 is native
        return
    kept = json.loads(next((int8_cache / "openvino").glob("*.int8.json")).read_text())
    speedup = kept["unet_s"]["fp32"] / kept["unet_s"]["int8"]
    holds = kept["psnr_db"] >= settings.int8_min_psnr and speedup >= runtimes.AUTO_MIN_SPEEDUP
    assert backend.precision == ("int8" if holds else "fp32")
