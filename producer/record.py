"""What `itsd run` leaves in its output folder: `itsd-run.json` and the before/after contact sheet, both true for
every image of the batch, whether this run made it or an earlier one (a rerun skips finished outputs, and
keeps what the earlier record said of them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from core.job import Result
from core.storage import join_uri, locate
from producer.batch import per_worker
from producer.sheet import write_contact_sheet
from producer.sources import BatchInput

SUMMARY_NAME = "itsd-run.json"
SHEET_NAME = "itsd-contact-sheet.jpg"
SHEET_ROWS = 50  # more images than this: the sheet shows the first, and says how many more itsd-run.json lists


def output_of(source: BatchInput, out: Path) -> str:
    """Where the batch writes SOURCE's output (a job's `output_uri`)."""
    return join_uri(str(out.resolve()), str(source.relative))


def previous_images(out: Path) -> dict[str, dict[str, Any]]:
    """The images an earlier run's record in OUT lists, by output; none if there is no readable record."""
    try:
        record = json.loads((out / SUMMARY_NAME).read_text())
        return {image["output"]: image for image in record["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def image_records(sources: list[BatchInput], found: list[Result], out: Path) -> list[dict[str, Any]]:
    """One entry per image of the batch whose output exists, by output: this run's result, else the earlier
    record's entry, else what the file itself says (its size)."""
    now = {r.output_uri: r for r in found if r.status == "done"}
    before = previous_images(out)
    records = []
    for output in sorted({output_of(s, out) for s in sources}):
        if output in now:
            r = now[output]
            size, working, tiles = [r.width, r.height], [r.working_width, r.working_height], r.tiles
            records.append({"output": output, "size": size, "working_size": working, "tiles": tiles, "this_run": True})
        elif output in before:
            records.append({**before[output], "this_run": False})
        elif Path(output).is_file():
            with Image.open(output) as image:
                size = list(image.size)
            records.append({"output": output, "size": size, "working_size": None, "tiles": None, "this_run": False})
    return records


def sheet_rows(sources: list[BatchInput], out: Path) -> list[tuple[Path, Path, str]]:
    """(input, output, caption) of every image of the batch with a local input and an output, by output."""
    rows = []
    for source in sorted(sources, key=lambda s: output_of(s, out)):
        local, output = locate(source.uri).path, Path(output_of(source, out))
        if local is not None and output.is_file():
            rows.append((local, output, f"{source.relative}: {source.instruction}"))
    return rows


def write_record(sources: list[BatchInput], found: list[Result], out: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write OUT/itsd-run.json and the contact sheet (the first SHEET_ROWS images, and how many more) for every
    image of the batch; `found` is this run's results. Returns the record."""
    images = image_records(sources, found, out)
    rows = sheet_rows(sources, out)
    sheet = out / SHEET_NAME
    if rows:
        write_contact_sheet(rows[:SHEET_ROWS], sheet, more=len(images) - len(rows[:SHEET_ROWS]))
    else:
        sheet.unlink(missing_ok=True)  # an earlier sheet would show images this batch no longer has
    summary = {
        **info,
        "per_worker": per_worker(found),
        "runtimes": sorted({r.runtime for r in found if r.runtime}),  # what the workers chose
        "images": images,
        "failures": [
            {"job_id": r.job_id, "error_type": r.error_type, "error": r.error_message}
            for r in found
            if r.status == "failed"
        ],
        "contact_sheet": str(sheet) if rows else None,
        "contact_sheet_rows": min(len(rows), SHEET_ROWS),
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
