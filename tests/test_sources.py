"""Inputs: every local path absolute, a bad manifest line failing alone, and no read that cannot end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from core.errors import ImageTooLarge, InvalidImage
from core.params import EditParams
from core.storage import read_uri
from producer.sources import collect_sources


def test_relative_inputs_become_absolute_so_a_worker_elsewhere_reads_the_same_file(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"input": "img/a.png", "output": "b.png"}) + "\n")
    monkeypatch.chdir(tmp_path)
    sources, rejected = collect_sources(["img/a.png", "jobs.jsonl"], "x", EditParams())
    assert not rejected and [s.uri for s in sources] == [str(tmp_path / "img" / "a.png")] * 2
    assert all(Path(s.uri).is_absolute() for s in sources)


def test_a_malformed_jsonl_line_fails_alone_with_its_line_number(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [json.dumps({"input": "a.png"}), "{not json", "[1, 2]", json.dumps({"input": "a.png", "output": "c.png"})]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    sources, rejected = collect_sources([str(tmp_path / "jobs.jsonl")], "x", EditParams())
    assert [str(s.relative) for s in sources] == ["a.png", "c.png"]
    assert [(r.where.rsplit(":", 1)[1], str(r.error)) for r in rejected] == [
        ("2", "not JSON: Expecting property name enclosed in double quotes"),
        ("3", "a row must be a JSON object"),
    ]


def test_a_manifest_row_may_set_detail_and_a_bad_one_fails_alone(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"input": "a.png", "detail": 0.25}, {"input": "a.png", "output": "b.png", "detail": "2"}]
    (tmp_path / "jobs.csv").write_text("input,output,detail\na.png,,0.25\na.png,b.png,2\n")
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    for manifest in ("jobs.csv", "jobs.jsonl"):
        sources, rejected = collect_sources([str(tmp_path / manifest)], "x", EditParams(steps=2))
        assert [(s.params.detail, s.params.steps) for s in sources] == [(0.25, 2)]
        assert [r.where.rsplit(":", 1)[1] for r in rejected] == ["3" if manifest == "jobs.csv" else "2"]
        assert "detail must be 0..1" in str(rejected[0].error)


@pytest.mark.parametrize("kind", ["fifo", "device", "too large"])
def test_an_input_that_is_no_regular_file_or_too_large_is_refused_before_reading(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pipe.png"
        os.mkfifo(path)  # reading it would block forever
        error, reason = InvalidImage, "not a regular file"
    elif kind == "device":
        path, error, reason = Path("/dev/zero"), InvalidImage, "not a regular file"  # reading it never ends
    else:
        path = tmp_path / "big.png"
        path.write_bytes(b"\0" * 2048)
        error, reason = ImageTooLarge, "2048 bytes is over the input limit of 1024"
    with pytest.raises(error, match=reason):
        read_uri(str(path), max_bytes=1024)


def test_an_input_within_the_limit_is_read_whole(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 1024)
    assert read_uri(str(tmp_path / "a.png"), max_bytes=1024) == b"x" * 1024
