"""A before/after contact sheet: one row per image, input beside output, captioned by its instruction."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from core.images import encode_image
from core.storage import write_atomic

CAPTION = 18  # pixels above each row for its caption


def contact_sheet(rows: list[tuple[Image.Image, Image.Image, str]], thumb: int = 256, more: int = 0) -> Image.Image:
    """Rows of `input | output`, each fitted into a `thumb` square, under a one-line caption; with `more`, a last
    line that says how many images the sheet leaves out."""
    pad, height = 8, CAPTION + thumb + 8
    footer = CAPTION + pad if more else 0
    sheet = Image.new("RGB", (2 * thumb + 3 * pad, pad + len(rows) * height + footer), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (before, after, caption) in enumerate(rows):
        top = pad + row * height
        draw.text((pad, top + 2), caption[:80], fill=(0, 0, 0))
        for column, image in enumerate((before, after)):
            fitted = ImageOps.contain(image.convert("RGB"), (thumb, thumb))
            x = pad + column * (thumb + pad) + (thumb - fitted.width) // 2
            sheet.paste(fitted, (x, top + CAPTION + (thumb - fitted.height) // 2))
    if more:
        note = f"... and {more} more (itsd-run.json lists every image)"
        draw.text((pad, pad + len(rows) * height + 2), note, fill=(0, 0, 0))
    return sheet


def write_contact_sheet(rows: list[tuple[Path, Path, str]], path: Path, more: int = 0) -> None:
    """The sheet of ROWS (input path, output path, caption), and a line for `more` images left out, at PATH."""
    images = []
    for before, after, caption in rows:
        with Image.open(before) as a, Image.open(after) as b:
            images.append((ImageOps.exif_transpose(a).copy(), b.copy(), caption))
    write_atomic(path, encode_image(contact_sheet(images, more=more), path.name))
