"""A before/after contact sheet: one row per image, input beside output."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from core.images import encode_image
from core.storage import write_atomic


def contact_sheet(pairs: list[tuple[Image.Image, Image.Image]], title: str, thumb: int = 256) -> Image.Image:
    """Rows of `input | output`, each fitted into a `thumb` square, under a one-line title."""
    header, pad = 28, 8
    sheet = Image.new("RGB", (2 * thumb + 3 * pad, header + len(pairs) * (thumb + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 8), title[:90], fill=(0, 0, 0))
    for row, pair in enumerate(pairs):
        for column, image in enumerate(pair):
            fitted = ImageOps.contain(image.convert("RGB"), (thumb, thumb))
            x = pad + column * (thumb + pad) + (thumb - fitted.width) // 2
            y = header + row * (thumb + pad) + (thumb - fitted.height) // 2
            sheet.paste(fitted, (x, y))
    return sheet


def write_contact_sheet(pairs: list[tuple[Path, Path]], title: str, path: Path) -> None:
    images = []
    for before, after in pairs:
        with Image.open(before) as a, Image.open(after) as b:
            images.append((ImageOps.exif_transpose(a).copy(), b.copy()))
    write_atomic(path, encode_image(contact_sheet(images, title), path.name))
