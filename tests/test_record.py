"""What `itsd run` leaves in its output folder: itsd-run.json and the contact sheet, for every image of the batch."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from core.job import Result
from core.params import EditParams
from producer.record import SHEET_NAME, SHEET_ROWS, SUMMARY_NAME, output_of, write_record
from producer.sheet import CAPTION
from producer.sources import BatchInput
from tests.conftest import photo

THUMB, PAD = 256, 8
ROW = CAPTION + THUMB + PAD  # one row's height on the sheet


def batch(tmp_path: Path, count: int, done: int) -> tuple[list[BatchInput], Path]:
    """COUNT small inputs, the first DONE of them with an output in OUT."""
    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    sources = []
    for i in range(count):
        name = f"p{i:03d}.png"
        photo(16, 12, seed=i).save(tmp_path / "in" / name)
        sources.append(BatchInput(str(tmp_path / "in" / name), PurePosixPath(name), "x", EditParams()))
    for source in sources[:done]:
        Path(output_of(source, out)).parent.mkdir(parents=True, exist_ok=True)
        photo(16, 12, seed=99).save(output_of(source, out))
    return sources, out


def result(source: BatchInput, out: Path) -> Result:
    return Result("j" + source.relative.stem, "done", output_uri=output_of(source, out), width=16, height=12,
                  working_width=64, working_height=64, tiles=1)  # fmt: skip


def test_the_contact_sheet_of_a_15_image_batch_shows_all_15(tmp_path):
    sources, out = batch(tmp_path, 15, done=15)
    summary = write_record(sources, [result(s, out) for s in sources], out, {})
    with Image.open(out / SHEET_NAME) as sheet:
        assert sheet.height == PAD + 15 * ROW
    assert summary["contact_sheet_rows"] == 15 and len(summary["images"]) == 15


def test_a_batch_over_the_cap_gets_a_sheet_that_says_how_many_more_there_are(tmp_path):
    sources, out = batch(tmp_path, SHEET_ROWS + 3, done=SHEET_ROWS + 3)
    summary = write_record(sources, [], out, {})
    with Image.open(out / SHEET_NAME) as sheet:
        assert sheet.height == PAD + SHEET_ROWS * ROW + CAPTION + PAD  # a last line, for "... and 3 more"
        footer = np.asarray(sheet.convert("L"))[PAD + SHEET_ROWS * ROW :]
    assert (footer < 128).any()  # the line is written
    assert summary["contact_sheet_rows"] == SHEET_ROWS and len(summary["images"]) == SHEET_ROWS + 3


def test_a_rerun_keeps_the_earlier_runs_images_in_the_record_and_on_the_sheet(tmp_path):
    sources, out = batch(tmp_path, 3, done=2)
    write_record(sources, [result(s, out) for s in sources[:2]], out, {})
    photo(16, 12, seed=5).save(output_of(sources[2], out))  # the rerun makes the third
    summary = write_record(sources, [result(sources[2], out)], out, {})
    images = {Path(i["output"]).name: i for i in summary["images"]}
    assert [images[f"p00{i}.png"]["this_run"] for i in range(3)] == [False, False, True]
    assert all(i["working_size"] == [64, 64] and i["tiles"] == 1 for i in images.values())  # kept from the first
    assert json.loads((out / SUMMARY_NAME).read_text())["images"] == summary["images"]
    with Image.open(out / SHEET_NAME) as sheet:
        assert sheet.height == PAD + 3 * ROW
