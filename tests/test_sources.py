"""Inputs: every local path absolute, a bad manifest line failing alone, and no read that cannot end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from core.access import Access
from core.errors import ImageTooLarge, InvalidImage
from core.inputs import expand
from core.params import EditParams
from core.storage import locate, read_uri
from producer.sources import collect_sources


def test_relative_inputs_become_absolute_so_a_worker_elsewhere_reads_the_same_file(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"input": "img/a.png", "output": "b.png"}) + "\n")
    monkeypatch.chdir(tmp_path)
    sources, rejected = collect_sources(["img/a.png", "jobs.jsonl"], "x", EditParams(), Access())
    assert not rejected and [s.uri for s in sources] == [str(tmp_path / "img" / "a.png")] * 2
    assert all(Path(s.uri).is_absolute() for s in sources)


def test_a_malformed_jsonl_line_fails_alone_with_its_line_number(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [json.dumps({"input": "a.png"}), "{not json", "[1, 2]", json.dumps({"input": "a.png", "output": "c.png"})]
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    sources, rejected = collect_sources([str(tmp_path / "jobs.jsonl")], "x", EditParams(), Access())
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
        sources, rejected = collect_sources([str(tmp_path / manifest)], "x", EditParams(steps=2), Access())
        assert [(s.params.detail, s.params.steps) for s in sources] == [(0.25, 2)]
        assert [r.where.rsplit(":", 1)[1] for r in rejected] == ["3" if manifest == "jobs.csv" else "2"]
        assert "detail must be 0..1" in str(rejected[0].error)


def test_a_manifest_row_may_strip_metadata_and_an_unknown_choice_fails_alone(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "jobs.csv").write_text("input,output,metadata\na.png,,no-gps\na.png,b.png,\na.png,c.png,some\n")
    sources, rejected = collect_sources([str(tmp_path / "jobs.csv")], "x", EditParams(steps=2), Access())
    assert [s.params.metadata for s in sources] == ["no-gps", "all"]
    assert [r.where.rsplit(":", 1)[1] for r in rejected] == ["4"]
    assert "metadata must be one of all, no-gps, none" in str(rejected[0].error)


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


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reasons(rejected: list) -> dict[str, str]:
    return {
        r.where.rsplit(":", 1)[-1] if r.where.endswith(tuple("0123456789")) else r.where: str(r.error) for r in rejected
    }


def test_urls_of_schemes_the_fleet_refuses_fail_alone_and_nothing_is_fetched(tmp_path, listener):
    port, contacts = listener
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"input": "a.png"}, {"input": f"http://127.0.0.1:{port}/b.png"}, {"input": f"ftp://127.0.0.1:{port}/c.png"}]
    manifest = write_manifest(tmp_path / "jobs.jsonl", rows)
    url = f"http://127.0.0.1:{port}/d.png"
    sources, rejected = collect_sources([str(manifest), url], "x", EditParams(), Access(schemes=("file", "s3")))
    assert [s.uri for s in sources] == [str(tmp_path / "a.png")]
    assert reasons(rejected) == {
        "2": f"http://127.0.0.1:{port}/b.png: http:// is not allowed (allowed: file, s3; ITSD_URL_SCHEMES)",
        "3": f"ftp://127.0.0.1:{port}/c.png: ftp:// is not allowed (allowed: file, s3; ITSD_URL_SCHEMES)",
        url: f"{url}: http:// is not allowed (allowed: file, s3; ITSD_URL_SCHEMES)",
    }
    assert all(r.error.code == "outside_roots" for r in rejected)
    assert contacts == []


def test_manifest_values_keep_the_command_lines_types_and_ranges_and_fail_by_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    bad = [
        ({"steps": 2.9}, "steps must be an integer, got 2.9"),
        ({"seed": 7.8}, "seed must be an integer, got 7.8"),
        ({"steps": True}, "steps must be an integer, got True"),
        ({"instruction": 123}, "instruction must be text, got 123"),
        ({"output": 5}, "output must be text, got 5"),
        ({"guidance_scale": 1e308}, "guidance_scale must be 0..100, got 1e+308"),
        ({"image_guidance_scale": "1e400"}, "image_guidance_scale must be finite, got inf"),
        ({"seed": 2**64}, f"seed must be 0..{2**63 - 1}, got {2**64}"),
        ({"steps": "2.9"}, "steps: '2.9' is not a whole number"),
        ({"detail": "half"}, "detail: 'half' is not a number"),
    ]
    good = [{"input": "a.png", "output": "t.png", "steps": "3", "seed": 7}, {"input": "a.png", "guidance_scale": 7}]
    rows = [{"input": "a.png", "output": f"{i}.png", **row} for i, (row, _) in enumerate(bad)] + good
    sources, rejected = collect_sources([str(write_manifest(tmp_path / "m.jsonl", rows))], "x", EditParams(), Access())
    assert reasons(rejected) == {str(line): reason for line, (_, reason) in enumerate(bad, start=1)}
    assert [(s.params.steps, s.params.seed, s.params.guidance_scale) for s in sources] == [
        (3, 7, None),
        (None, None, 7),
    ]


@pytest.mark.parametrize(
    ("value", "scheme", "path", "key"),
    [
        ("photos/a.png", "file", "photos/a.png", "photos/a.png"),
        ("/data/a.png", "file", "/data/a.png", "data/a.png"),
        ("file:///data/a.png", "file", "/data/a.png", "data/a.png"),
        ("S3://bucket/a.png", "s3", None, "bucket/a.png"),
        ("odd/name://x.png", "file", "odd/name://x.png", "odd/name://x.png"),  # no scheme: a local path
    ],
)
def test_one_rule_tells_a_local_path_from_a_url(value, scheme, path, key):
    location = locate(value)
    assert (location.scheme, location.path, location.key) == (scheme, path and Path(path), key)


def test_a_file_uri_in_a_manifest_is_a_local_path_whose_key_is_its_path(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"input": f"file://{tmp_path}/a.png"}, {"input": f"file://{tmp_path}/a.png", "output": "b.png"}]
    sources, rejected = collect_sources([str(write_manifest(tmp_path / "m.jsonl", rows))], "x", EditParams(), Access())
    assert not rejected
    assert [(s.uri, str(s.relative)) for s in sources] == [
        (str(tmp_path / "a.png"), str(tmp_path / "a.png").lstrip("/")),
        (str(tmp_path / "a.png"), "b.png"),
    ]


def test_a_symlink_out_of_the_folder_it_was_found_in_fails_alone_and_one_within_is_followed(tmp_path):
    (tmp_path / "in" / ".store").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / ".store" / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "in" / "b.png").symlink_to(tmp_path / "in" / ".store" / "b.png")
    (tmp_path / "in" / "out.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    manifest = write_manifest(tmp_path / "in" / "m.jsonl", [{"input": "out.png", "output": "o.png"}])
    found, refused = expand([str(tmp_path / "in")])
    assert sorted(str(i.relative) for i in found) == ["a.png", "b.png"]
    assert [(r.where, r.error.code) for r in refused] == [(str(tmp_path / "in" / "out.png"), "outside_roots")]
    assert f"a symlink to {tmp_path / 'elsewhere' / 'secret.png'}, outside {tmp_path / 'in'}" in str(refused[0].error)
    sources, rejected = collect_sources([str(tmp_path / "in"), str(manifest)], "x", EditParams(), Access())
    assert sorted(str(s.relative) for s in sources) == ["a.png", "b.png"]
    assert sorted(r.where for r in rejected) == [f"{manifest}:1", str(tmp_path / "in" / "out.png")]


def test_itsd_edit_refuses_a_symlink_out_of_its_folder_alone_and_edits_the_rest(tiny_artifacts, tmp_path):
    from click.testing import CliRunner

    from producer.cli import itsd

    (tmp_path / "in").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "in" / "a.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "in" / "out.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    args = ["edit", str(tmp_path / "in"), "-m", str(tiny_artifacts), "-i", "x", "-o", str(tmp_path / "out"), "-q"]
    result = CliRunner().invoke(itsd, [*args, "--steps", "1", "--max-side", "64"])
    assert result.exit_code == 1 and "edited 1/2 image(s)" in result.output and "1 failed" in result.output
    assert (
        f"failed: {tmp_path / 'in' / 'out.png'}: a symlink to {tmp_path / 'elsewhere' / 'secret.png'}" in result.output
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
