"""The training data: dataset rows, the weighted task mixture sampled per step (`MixtureBatches`), and
the pairs it yields (`PairDataset`): aligned crops and flips, instructions paraphrased, words dropped or
inserted, all drawn from each item's own seed."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import InvalidParameters
from training.config import ConfigError, TrainConfig
from training.dataset import Crop, aligned_crop, as_pil, load_folder
from training.templates import load_templates


def tokenize(tokenizer: object, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def load_rows(cfg: TrainConfig) -> tuple[object, object]:
    """(training rows, validation rows) of the dataset folder (save_to_disk or parquet), checked for the needed
    columns.

    A DatasetDict gives its `train_split`, and its `validation_split` when that has rows; a plain Dataset
    (or a DatasetDict without validation rows) validates on training rows.
    """
    import datasets

    try:
        data = load_folder(Path(cfg.dataset))
    except FileNotFoundError as exc:
        raise ConfigError(f"dataset {cfg.dataset}: {exc}") from None
    held_out = None
    if isinstance(data, datasets.DatasetDict):
        if cfg.train_split not in data:
            raise ConfigError(f"dataset {cfg.dataset} has splits {', '.join(data)}, no {cfg.train_split!r}")
        if cfg.validation_split in data and len(data[cfg.validation_split]):
            held_out = data[cfg.validation_split]
        data = data[cfg.train_split]
    needed = [cfg.original_image_column, cfg.edit_prompt_column, cfg.edited_image_column]
    missing = [name for name in needed if name not in data.column_names]
    if missing:
        raise ConfigError(
            f"dataset {cfg.dataset} lacks column(s) {', '.join(missing)}; it has "
            f"{', '.join(data.column_names)} (set original_image_column / edit_prompt_column / "
            f"edited_image_column)"
        )
    if len(data) == 0:
        raise ConfigError(f"dataset {cfg.dataset} has no training rows")
    optional = [name for name in (cfg.task_column, cfg.instruction_choices_column) if name in data.column_names]
    data = data.select_columns(needed + optional)
    held_out = (
        data
        if held_out is None
        else held_out.select_columns([name for name in needed + optional if name in held_out.column_names])
    )
    return data, held_out


def load_paraphrases(folder: Path | None, tasks: Sequence[str]) -> dict[str, list[str]]:
    """Instruction templates of each task that has a `<task>.txt` file (training.templates); others: none."""
    found = {}
    for task in sorted(set(tasks) - {""}):
        try:
            found[task] = load_templates(task, folder)
        except InvalidParameters:
            continue
    return found


def row_weights(tasks: Sequence[str], task_weights: dict[str, float]) -> np.ndarray:
    """Sampling probability of each row: a task's weight shared evenly by its rows ({} = every row alike)."""
    counts = Counter(tasks)
    if not task_weights:
        return np.full(len(tasks), 1.0 / len(tasks))
    unknown = sorted(set(task_weights) - set(counts))
    if unknown:
        raise ConfigError(
            f"task_weights names task(s) {', '.join(unknown)} the dataset lacks (it has {', '.join(sorted(counts))})"
        )
    unweighted = sorted(set(counts) - set(task_weights))
    if unweighted:
        raise ConfigError(
            f"task_weights gives no weight to task(s) {', '.join(unweighted)}: weigh every task (0 leaves one out)"
        )
    weights = np.array([task_weights[task] / counts[task] for task in tasks], dtype=np.float64)
    if weights.sum() <= 0:
        raise ConfigError("task_weights are all zero")
    return weights / weights.sum()


class MixtureBatches:
    """Batch sampler: for each (step, micro-batch), `batch_size` keys (row, sample seed) drawn with the row
    weights from a generator keyed by (seed, step, micro, rank). It has no state but the step it starts at."""

    def __init__(
        self,
        weights: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int,
        start_step: int,
        max_steps: int,
        accumulation: int,
    ) -> None:
        self.weights, self.batch_size, self.seed, self.rank = weights, batch_size, seed, rank
        self.start_step, self.max_steps, self.accumulation = start_step, max_steps, accumulation

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            for micro in range(self.accumulation):
                rng = np.random.default_rng([self.seed, step, micro, self.rank, 0])
                rows = rng.choice(len(self.weights), size=self.batch_size, p=self.weights)
                seeds = rng.integers(0, 2**63 - 1, size=self.batch_size)
                yield [(int(row), int(sample_seed)) for row, sample_seed in zip(rows, seeds, strict=True)]


class PairDataset(torch.utils.data.Dataset):
    """Training samples from dataset rows; an item is keyed by (row, sample seed), which fixes its crop, flip
    and paraphrase."""

    def __init__(self, rows: object, cfg: TrainConfig, tokenizer: object) -> None:
        self.rows, self.cfg, self.tokenizer = rows, cfg, tokenizer
        if cfg.task_column in rows.column_names:
            self.tasks = [str(task) for task in rows[cfg.task_column]]
        else:
            self.tasks = [""] * len(rows)
        self.task_names = sorted(set(self.tasks))
        self.task_ids = [self.task_names.index(task) for task in self.tasks]  # a sample's "task" in a batch
        self.paraphrases = load_paraphrases(Path(cfg.instructions_dir) if cfg.instructions_dir else None, self.tasks)
        self.has_choices = cfg.instruction_choices_column in rows.column_names
        self.unheard: list[str] = []  # instruction_word_insertion's words
        if cfg.instruction_word_insertion:
            self.unheard = unheard_words(tokenizer, [line for lines in self.paraphrases.values() for line in lines])

    def __len__(self) -> int:
        return len(self.rows)

    def pair(self, index: int, rng: np.random.Generator | None) -> tuple[Image.Image, Image.Image, str]:
        """(input, target, instruction) of row `index`; rng None = centre crop, no flip, the row's own text.

        With an rng the instruction is a paraphrase drawn per sample: from the row's own choices when the
        dataset keeps them, else from its task's templates file, else the row's instruction text; then each of
        its words is dropped with probability `instruction_word_dropout`, and up to `instruction_word_insertion`
        unheard words are put in.
        """
        row = self.rows[index]
        original, edited = crop_pair(
            as_pil(row[self.cfg.original_image_column]),
            as_pil(row[self.cfg.edited_image_column]),
            self.cfg.resolution,
            self.cfg.center_crop or rng is None,
            self.cfg.random_flip,
            rng,
            self.cfg.resize_before_crop,
            self.cfg.random_channel_order,
        )
        templates = self.paraphrases.get(self.tasks[index])
        if self.has_choices and row[self.cfg.instruction_choices_column]:
            templates = list(row[self.cfg.instruction_choices_column])
        if rng is not None and templates:
            drawn = templates[int(rng.integers(len(templates)))]
            instruction = drop_words(drawn, self.cfg.instruction_word_dropout, rng)
            instruction = insert_words(instruction, self.cfg.instruction_word_insertion, self.unheard, rng)
        else:
            instruction = str(row[self.cfg.edit_prompt_column])
        return original, edited, instruction

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, sample_seed = key
        original, edited, instruction = self.pair(index, np.random.default_rng(sample_seed))
        return {
            "original": to_tensor(original),
            "edited": to_tensor(edited),
            "instruction": instruction,
            "task": self.task_ids[index],
        }

    def collate(self, items: list[dict]) -> dict:
        return {
            "original": torch.stack([item["original"] for item in items]),
            "edited": torch.stack([item["edited"] for item in items]),
            "input_ids": tokenize(self.tokenizer, [item["instruction"] for item in items]),
            "task": torch.tensor([item["task"] for item in items]),
        }


def drop_words(text: str, p: float, rng: np.random.Generator) -> str:
    """`text` with each word dropped with probability `p`, in order; one word always stays."""
    words = text.split()
    if p <= 0 or len(words) < 2:
        return text
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(word for word, kept in zip(words, keep, strict=True) if kept)


def unheard_words(tokenizer: object, paraphrases: Sequence[str]) -> list[str]:
    """The whole words of a CLIP tokenizer's vocabulary (letters only, at least 3) that no paraphrase uses."""
    heard = {word for line in paraphrases for word in re.findall(r"[a-z]+", line.lower())}
    words = (token.removesuffix("</w>") for token in tokenizer.get_vocab() if token.endswith("</w>"))
    return sorted(word for word in words if len(word) >= 3 and word.isalpha() and word.isascii() and word not in heard)


def insert_words(text: str, most: int, words: Sequence[str], rng: np.random.Generator) -> str:
    """`text` with 0 to `most` (uniformly) of `words`, drawn at random, each put in at a random place."""
    if most <= 0 or not words:
        return text
    tokens = text.split()
    for _ in range(int(rng.integers(most + 1))):
        tokens.insert(int(rng.integers(len(tokens) + 1)), words[int(rng.integers(len(words)))])
    return " ".join(tokens)


def crop_pair(
    original: Image.Image,
    edited: Image.Image,
    resolution: int,
    center: bool,
    flip: bool,
    rng: np.random.Generator | None,
    resize: bool = True,
    shuffle_channels: bool = False,
) -> tuple[Image.Image, Image.Image]:
    """The target resized to the input's exact size (pixels stay aligned), then both cut with the same box
    by `training.dataset.aligned_crop` (short side to `resolution` unless `resize` is off, then a centred or
    random square); optionally both flipped, and both given one random order of R, G and B."""
    if edited.size != original.size:
        edited = edited.resize(original.size, Image.Resampling.BICUBIC)
    random_box = not center and rng is not None
    crop = Crop(resolution, "random" if random_box else "center", resize)
    pair = aligned_crop([np.asarray(original), np.asarray(edited)], crop, rng if random_box else None)
    if flip and rng is not None and rng.random() < 0.5:
        pair = [np.ascontiguousarray(image[:, ::-1]) for image in pair]
    if shuffle_channels and rng is not None:
        order = rng.permutation(3)
        pair = [np.ascontiguousarray(image[..., order]) for image in pair]
    return Image.fromarray(pair[0]), Image.fromarray(pair[1])


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float32 CHW in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
