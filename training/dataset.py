"""The shape of a prepared dataset: schemas, splits, aligned crops, and writing it to disk and reading it back.

The schemas are the public ones of the InstructPix2Pix instruction-tuning blog, so a dataset made here
and `instruction-tuning-sd/cartoonization` or `.../low-level-image-proc` train alike. Rows are written
as they come (Arrow files per split), so memory stays flat however many photos there are.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from datasets import Dataset, DatasetDict, DatasetInfo, Features, Image, Sequence, Value
from datasets.arrow_writer import ArrowWriter
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from PIL import Image as PILImage

from core.errors import InvalidImage, InvalidParameters
from core.images import decode_image, encode_image, read_image_file, to_rgb


@dataclass(frozen=True)
class Schema:
    input_column: str
    instruction_column: str
    target_column: str

    def override(self, input_column: str | None, instruction_column: str | None, target_column: str | None) -> Schema:
        """This schema with the column names that are given (not None or empty) put in."""
        return Schema(
            input_column or self.input_column,
            instruction_column or self.instruction_column,
            target_column or self.target_column,
        )


SCHEMAS = {
    "cartoonization": Schema("original_image", "edit_prompt", "cartoonized_image"),
    "low-level": Schema("input_image", "instruction", "ground_truth_image"),
}
TASK_COLUMN, SOURCE_COLUMN = "task", "source"  # which templates a row uses; which photo it came from
CHOICES_COLUMN = "instruction_choices"  # every paraphrase, when the trainer samples one per step
SPLITS = ("train", "validation", "test")


def schema_for(tasks: list[str]) -> str:
    return "cartoonization" if set(tasks) == {"cartoonization"} else "low-level"


def features(schema: Schema, all_paraphrases: bool) -> Features:
    columns = [
        (schema.input_column, Image()),
        (schema.instruction_column, Value("string")),
        (schema.target_column, Image()),
        (TASK_COLUMN, Value("string")),
        (SOURCE_COLUMN, Value("string")),
    ] + ([(CHOICES_COLUMN, Sequence(Value("string")))] if all_paraphrases else [])
    names = [name for name, _ in columns]
    if len(set(names)) != len(names):
        raise InvalidParameters(f"column names must all differ, got {', '.join(names)}")
    return Features(dict(columns))


def split_of(key: str, seed: int, fractions: dict[str, float]) -> str:
    """The split of everything made from `key`: a hash, so it never depends on order or on other photos."""
    digest = hashlib.sha256(f"split|{seed}|{key}".encode()).digest()
    point, edge = int.from_bytes(digest[:8], "little") / 2**64, 0.0
    for split, fraction in fractions.items():
        edge += fraction
        if point < edge:
            return split
    return next(iter(fractions))


@dataclass(frozen=True)
class Crop:
    size: int = 256  # the blog trained at 256 px; sides of the square crop
    mode: str = "random"  # random | center | none (resize only, aspect kept, not square)
    resize: bool = True  # short side to `size` first; off: crop patches at native scale (keeps noise statistics)


def aligned_crop(images: list[np.ndarray], crop: Crop, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Resize and crop every image with the same box, so an input and its target stay pixel-aligned.

    `rng` places a random box; a centre crop or none needs no rng."""
    height, width = images[0].shape[:2]
    for image in images[1:]:
        if image.shape[:2] != (height, width):
            raise InvalidImage(f"input is {width}x{height} but its target is {image.shape[1]}x{image.shape[0]}")
    short = min(height, width)
    scale = crop.size / short if crop.resize else max(1.0, crop.size / short)  # never crop past the edge
    if scale != 1.0:
        size = (round(width * scale), round(height * scale))  # the short side rounds to exactly crop.size
        images = [np.asarray(PILImage.fromarray(im).resize(size, PILImage.Resampling.LANCZOS)) for im in images]
        height, width = images[0].shape[:2]
    if crop.mode == "none":
        return images
    if crop.mode == "random":
        if rng is None:
            raise ValueError("a random crop needs an rng")
        top, left = int(rng.integers(height - crop.size + 1)), int(rng.integers(width - crop.size + 1))
    else:
        top, left = (height - crop.size) // 2, (width - crop.size) // 2
    return [im[top : top + crop.size, left : left + crop.size] for im in images]


def png(pixels: np.ndarray) -> dict[str, bytes | None]:
    """An `Image()` feature value: PNG bytes (lossless, so targets are exact)."""
    return {"bytes": encode_image(PILImage.fromarray(pixels), "image.png"), "path": None}


class DatasetWriter:
    """Streams rows into one Arrow file per split, then saves a `DatasetDict` (or parquet files) at `out`."""

    def __init__(self, out: Path, features: Features, splits: list[str], fmt: str = "arrow") -> None:
        self.out, self.features, self.fmt = out, features, fmt
        self.tmp = out.parent / f".{out.name}.partial"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.writers = {s: ArrowWriter(features=features, path=str(self.tmp / f"{s}.arrow")) for s in splits}
        self.rows = dict.fromkeys(splits, 0)

    def write(self, split: str, row: dict) -> None:
        self.writers[split].write(self.features.encode_example(row))
        self.rows[split] += 1

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self._save()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _save(self) -> None:
        quiet = are_progress_bars_disabled()
        disable_progress_bars()  # the caller shows its own progress; saving is a copy
        try:
            self._copy_out()
        finally:
            if not quiet:
                enable_progress_bars()

    def _copy_out(self) -> None:
        splits = {}
        for split, writer in self.writers.items():
            writer.finalize()
            writer.close()
            info = DatasetInfo(features=self.features)
            splits[split] = Dataset.from_file(str(self.tmp / f"{split}.arrow"), info=info, in_memory=False)
        if self.out.exists():
            shutil.rmtree(self.out)
        if self.fmt == "parquet":
            (self.out / "data").mkdir(parents=True)
            for split, ds in splits.items():
                if len(ds) == 0:  # load_dataset refuses a split with no data
                    continue
                ds.to_parquet(str(self.out / "data" / f"{split}-00000-of-00001.parquet"))
        else:
            empty = {split: 1 for split, ds in splits.items() if len(ds) == 0}  # 0 shards would not load back
            DatasetDict(splits).save_to_disk(str(self.out), num_shards=empty)


def load_folder(folder: Path) -> Dataset | DatasetDict:
    """A dataset folder in either of `itsd prepare`'s formats: parquet files under data/ named
    <split>-*.parquet (load_dataset's layout, as the Hub keeps them), else a save_to_disk folder.
    FileNotFoundError when it is neither."""
    from datasets import load_dataset, load_from_disk

    files: dict[str, list[str]] = {}
    for path in sorted((folder / "data").glob("*.parquet")):
        files.setdefault(path.name.split("-")[0], []).append(str(path))
    if files:
        return load_dataset("parquet", data_files=files)
    return load_from_disk(str(folder))


def as_pil(value: object) -> PILImage.Image:
    """A dataset cell as an RGB image: a PIL image (datasets' Image feature), {bytes|path}, or a path."""
    if isinstance(value, PILImage.Image):
        return to_rgb(value)
    if isinstance(value, dict) and value.get("bytes"):
        return decode_image(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        return read_image_file(Path(value["path"]))
    if isinstance(value, str | Path):
        return read_image_file(Path(value))
    raise InvalidImage(f"cannot read an image from a dataset cell of type {type(value).__name__}")
