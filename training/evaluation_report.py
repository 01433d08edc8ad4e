"""What `itsd evaluate` writes: metrics.json (strict JSON), the metrics.md table, and the comparison grids."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

GRID_TILE = 256  # side of one grid cell in px; every image is fitted into it, aspect kept
GRID_HEADER = 20  # px of column names above the grid


def _cell(value: float, digits: int, sign: bool = False) -> str:
    return f"{value:+.{digits}f}" if sign and math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """task | model | PSNR | SSIM | input PSNR | input SSIM | gain dB | target (+ CLIP columns when measured)."""
    with_clip = any("clip_image" in m for t in report["tasks"].values() for m in t["models"].values())
    header = ["task", "model", "PSNR", "SSIM", "input PSNR", "input SSIM", "gain dB", "target"]
    header += ["CLIP image", "CLIP direction"] if with_clip else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for task, summary in report["tasks"].items():
        identity = summary["identity"]
        for name, m in summary["models"].items():
            cells = [task, name, _cell(m["psnr"], 2), _cell(m["ssim"], 4), _cell(identity["psnr"], 2)]
            cells += [_cell(identity["ssim"], 4), _cell(m["gain_db"], 2, sign=True), summary["reference"]]
            cells += [_cell(m["clip_image"], 4), _cell(m["clip_direction"], 4)] if with_clip else []
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fit(image: Image.Image) -> Image.Image:
    tile = Image.new("RGB", (GRID_TILE, GRID_TILE), "white")
    fitted = ImageOps.contain(image, (GRID_TILE, GRID_TILE), Image.Resampling.LANCZOS)
    tile.paste(fitted, ((GRID_TILE - fitted.width) // 2, (GRID_TILE - fitted.height) // 2))
    return tile


def make_grid(rows: list[list[Image.Image]], names: Sequence[str]) -> Image.Image:
    """One row per example (input | model... | target) under a header of column names."""
    grid = Image.new("RGB", (len(names) * GRID_TILE, GRID_HEADER + len(rows) * GRID_TILE), "white")
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(names):
        draw.text((column * GRID_TILE + 4, 4), name, fill="black")
    for r, images in enumerate(rows):
        for column, image in enumerate(images):
            grid.paste(_fit(image), (column * GRID_TILE, GRID_HEADER + r * GRID_TILE))
    return grid


def _json_safe(value: Any) -> Any:
    """inf and nan (identical images, empty means) as the strings "inf"/"nan": strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(out: Path, report: dict[str, Any], grids: dict[str, list[list[Image.Image]]]) -> list[Path]:
    """Write metrics.json, metrics.md and grids/<task>.png under `out`; returns the grid paths."""
    (out / "grids").mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    (out / "metrics.md").write_text(markdown_table(report))
    names = ["input", *report["models"], "target"]
    paths = []
    for task, rows in grids.items():
        if not rows:  # --grid-rows 0
            continue
        path = out / "grids" / f"{task.replace('/', '_')}.png"
        make_grid(rows, names).save(path)
        paths.append(path)
    return paths
