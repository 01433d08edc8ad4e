"""Turning inputs and manifests into sources: every local path absolute, a bad manifest line failing alone."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from core.params import EditParams
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
