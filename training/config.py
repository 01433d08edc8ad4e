"""`TrainConfig`: every knob of `itsd train` in one typed object.

The defaults are the values the reference runs used (instruction-tuned-sd: 256 px, batch 2 x grad-accum 4,
15000 steps, lr 5e-5 constant, EMA, gradient checkpointing, seed 42), except that conditioning dropout is on
(0.05, as in diffusers' InstructPix2Pix README) because without it classifier-free guidance has nothing to
contrast. Values come from, in rising precedence: the defaults, a TOML file (flat keys), `--set key=value`,
then the dedicated CLI flags. An unknown key anywhere is an error that names it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InvalidModel, PermanentError
from core.params import check_edit_defaults

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine", "linear")
LOSS_WEIGHTINGS = ("uniform", "input_error")


class ConfigError(PermanentError):
    """A training config that names an unknown key or holds a value of the wrong type or range."""

    code = "config"


@dataclass
class TrainConfig:
    # --- inputs and outputs
    pretrained: str = ""  # diffusers checkpoint folder: InstructPix2Pix (8-ch UNet) or SD (4-ch, widened)
    dataset: str = ""  # a `datasets.save_to_disk` folder (e.g. from `itsd prepare`)
    output_dir: str = "itsd-out/train"  # checkpoints, validation grids, TensorBoard logs, final/
    resume: str = ""  # "" = fresh start, "latest" = newest checkpoint in output_dir, or a checkpoint path
    # --- dataset schema (defaults: the low-level schema; cartoon data uses the three names in its comment)
    original_image_column: str = "input_image"  # cartoon: "original_image"
    edit_prompt_column: str = "instruction"  # cartoon: "edit_prompt"
    edited_image_column: str = "ground_truth_image"  # cartoon: "cartoonized_image"
    train_split: str = "train"  # when the folder holds a DatasetDict (as `itsd prepare` writes)
    validation_split: str = "validation"  # validation rows come from here when present, else from train
    instruction_choices_column: str = "instruction_choices"  # per-row paraphrase lists (`prepare`), if present
    task_column: str = "task"  # rows are grouped by it for mixture weights and paraphrases; absent = one task
    task_weights: dict[str, float] = field(default_factory=dict)  # share of samples per task; {} = by row count
    instructions_dir: str = ""  # paraphrase files <task>.txt, one per line; "" = training/instructions
    instruction_word_dropout: float = 0.0  # each word of a drawn paraphrase is dropped with this probability (one
    # always stays): the model learns which words name the task, not whole sentences, and hears unseen phrasings
    instruction_word_insertion: int = 0  # then up to this many words it never hears otherwise (the tokenizer's
    # vocabulary less every paraphrase's words) go in at random places: a user's phrasing is mostly such words,
    # and a from-scratch text encoder must learn that they name no task. 0 = off
    # --- images
    resolution: int = 256  # training side in px (reference runs: 256); pairs share one resize and crop
    center_crop: bool = False  # False = random crop (same box on input and target), as the reference
    random_flip: bool = False  # a flip is a valid augmentation for most edits, but the reference ran without
    random_channel_order: bool = False  # R, G, B shuffled (the same order on input and target): with a handful of
    # photos the UNet otherwise learns their colours from their textures instead of copying the input's
    resize_before_crop: bool = True  # short side to `resolution` first; False: crop at native scale (keeps the
    # size of noise, streaks and blur as prepared, e.g. 128-px patches of 256-px rows for a model run at 256)
    native_size: int = 0  # px of the tiles the model edits in, recorded as final/'s UNet sample size (times the
    # VAE scale); 0: `resolution`. Set it where the model is run on larger images than its patches
    # --- optimisation
    train_batch_size: int = 2  # per device; with grad-accum 4 the reference's effective batch of 8
    gradient_accumulation_steps: int = 4
    max_train_steps: int = 15000  # optimizer steps
    learning_rate: float = 5e-5  # reference runs; higher drifts a pretrained UNet fast
    lr_scheduler: str = "constant"  # constant | cosine | linear (decay to 0 at max_train_steps)
    lr_warmup_steps: int = 0  # linear warmup from 0, before the schedule
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2  # diffusers' default for its SD fine-tuning scripts
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # clip; 0 = off
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit: less optimizer memory on GPU
    min_timestep: int = 0  # timesteps are drawn from [min_timestep, num_train_timesteps): a model that predicts the
    # clean image need not learn to copy nearly clean latents if its sampler never asks (trailing spacing)
    timestep_bias_multiplier: float = 1.0  # the latest `timestep_bias_portion` of the range is drawn this many
    # times as often (diffusers' "later" bias); at those the noisy latents tell little, so there the model must
    # restore from the input image, as at the first sampling steps. 1 = uniform (the itsd-tiny card: no help there)
    timestep_bias_portion: float = 0.25
    loss_weighting: str = "uniform"  # uniform: plain MSE (the reference); input_error: each sample's MSE over its
    # input's own error against the target (the identity edit's), so tasks count by how much of their damage is
    # undone, not by its size: a dark photo's error is ~100x a blurred one's, and would otherwise set the model
    input_error_floor: float = 0.005  # input_error: an input closer than this (scaled latents have unit variance:
    # 0.005 is ~23 dB below the signal) weighs as if it were this far, so an untouched row (input = target) or a
    # crop the damage barely touched cannot take the batch over: 1 / floor is the most a sample weighs
    input_error_ceiling: float = 0.0  # input_error: an input further than this weighs as if it were this far, so
    # a dark photo (error ~1.5) still counts: 1 / ceiling is the least a sample weighs; 0 = no ceiling
    conditioning_dropout_prob: float = 0.05  # p: text dropped for r<2p, image for p<=r<3p (both for p<=r<2p)
    train_text_encoder: bool = False  # also train the text encoder (a from-scratch model has no CLIP to keep)
    text_task_loss_weight: float = 0.0  # with train_text_encoder: a linear head over each instruction's mean token
    # state must name its row's task (cross-entropy, this weight beside the diffusion loss), so the encoder keeps the
    # tasks apart while it learns with the UNet; the head is not saved in final/. 0 = off
    use_ema: bool = True  # EMA of the trained weights (UNet, and text encoder if trained): what final/ holds
    ema_decay: float = 0.9999  # diffusers' EMAModel default (with its (1+t)/(10+t) warmup)
    gradient_checkpointing: bool = True  # ~halves activation memory for ~30% more compute (reference: on)
    mixed_precision: str = "auto"  # auto = bf16 (or fp16) on CUDA, fp32 on CPU; or no | fp16 | bf16
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs; ignored on CPU
    seed: int = 42  # reference runs; with it every draw (rows, crops, prompts, noise) is reproducible
    dataloader_num_workers: int = 0  # image decoding and cropping processes; 0 = in the training process
    # --- checkpoints, validation, logging
    checkpointing_steps: int = 500  # save full training state every N steps; 0 = only at the end
    checkpoints_total_limit: int = 3  # keep this many newest checkpoints; 0 = keep all
    validation_steps: int = 1000  # run the pipeline on validation rows every N steps; 0 = off
    num_validation_rows: int = 4  # rows spread evenly over the dataset
    validation_inference_steps: int = 20  # as diffusers' training script
    validation_guidance_scale: float = 7.0
    validation_image_guidance_scale: float = 1.5
    # Written to final/edit_defaults.json: the steps and guidance scales the model is meant to be run with, used
    # wherever a user sets none (core.params). {} = the base checkpoint's, if it has any.
    edit_defaults: dict[str, float] = field(default_factory=dict)

    def final_edit_defaults(self) -> dict[str, float]:
        """`edit_defaults` as the checkpoint's JSON: steps a whole number (TOML tables here hold floats)."""
        steps = self.edit_defaults.get("steps")
        whole = steps is not None and float(steps).is_integer()
        return {**self.edit_defaults, **({"steps": int(steps)} if whole else {})}

    def __post_init__(self) -> None:
        problems = []
        if self.resolution <= 0 or self.resolution % 8:
            problems.append(f"resolution must be a positive multiple of 8 (got {self.resolution})")
        if self.native_size < 0 or self.native_size % 8:
            problems.append(
                f"native_size must be 0 (the resolution) or a positive multiple of 8 (got {self.native_size})"
            )
        if not 0.0 <= self.conditioning_dropout_prob <= 1 / 3:
            problems.append(f"conditioning_dropout_prob must be in [0, 1/3] (got {self.conditioning_dropout_prob})")
        if not 0.0 <= self.instruction_word_dropout < 1:
            problems.append(f"instruction_word_dropout must be in [0, 1) (got {self.instruction_word_dropout})")
        if self.instruction_word_insertion < 0:
            problems.append(f"instruction_word_insertion must be at least 0 (got {self.instruction_word_insertion})")
        if self.text_task_loss_weight < 0 or (self.text_task_loss_weight and not self.train_text_encoder):
            problems.append("text_task_loss_weight must be at least 0, and above 0 only with train_text_encoder")
        if self.timestep_bias_multiplier <= 0 or not 0 < self.timestep_bias_portion <= 1:
            problems.append("timestep_bias_multiplier must be above 0 and timestep_bias_portion in (0, 1]")
        if self.min_timestep < 0:
            problems.append(f"min_timestep must be at least 0 (got {self.min_timestep})")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.input_error_floor <= 0:
            problems.append(f"input_error_floor must be above 0 (got {self.input_error_floor})")
        if self.input_error_ceiling and self.input_error_ceiling < self.input_error_floor:
            problems.append(
                f"input_error_ceiling must be 0 (none) or at least input_error_floor ({self.input_error_floor})"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            problems.append(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}")
        if self.lr_scheduler not in LR_SCHEDULES:
            problems.append(f"lr_scheduler must be one of {', '.join(LR_SCHEDULES)}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if any(weight < 0 for weight in self.task_weights.values()):
            problems.append("task_weights must not be negative")
        try:
            check_edit_defaults(self.final_edit_defaults(), "edit_defaults")
        except InvalidModel as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_type(key: str, value: object, expected: object) -> object:
    """Return `value` as the field's type, or raise ConfigError. Ints are accepted for floats."""
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    else:  # dict[str, float]
        ok = isinstance(value, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        )
        value = {str(k): float(v) for k, v in value.items()} if ok else value
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"config key {key!r} must be {name}, got {value!r}")
    return value


def apply(config: TrainConfig, values: dict[str, object], source: str) -> TrainConfig:
    """A copy of `config` with `values` set; unknown keys and wrong types raise ConfigError naming them."""
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config key {', '.join(map(repr, unknown))} in {source}")
    checked = {key: _check_type(key, value, types[key]) for key, value in values.items()}
    return dataclasses.replace(config, **checked)


def parse_override(item: str) -> tuple[str, object]:
    """`key=value` from `--set`: strings are taken verbatim unless quoted as TOML writes them (`key="value"`, as
    `--print-config` prints them); other types are read as TOML values."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    types = _field_types()
    if key not in types:
        raise ConfigError(f"unknown config key {key!r} in --set")
    value = raw.strip()
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'"
    if types[key] is str and not quoted:
        return key, raw
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--set {key}: cannot read {raw!r} as a value") from None


def load_config(
    path: Path | None = None, overrides: typing.Sequence[str] = (), flags: dict[str, object] | None = None
) -> TrainConfig:
    """Defaults, then the TOML file, then `--set` overrides, then the dedicated flags (None = not given)."""
    config = TrainConfig()
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        config = apply(config, table, str(path))
    config = apply(config, dict(parse_override(item) for item in overrides), "--set")
    given = {key: value for key, value in (flags or {}).items() if value is not None}
    return apply(config, given, "flags")


# Keys a resumed run may change and still continue with the losses of an uninterrupted one: where it stops and
# what it saves, validates and loads with (gradient checkpointing recomputes the same activations).
RESUMABLE = frozenset(
    {
        "output_dir",
        "resume",
        "max_train_steps",
        "dataloader_num_workers",
        "gradient_checkpointing",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "num_validation_rows",
        "validation_inference_steps",
        "validation_guidance_scale",
        "validation_image_guidance_scale",
        "edit_defaults",
    }
)


def changed_for_resume(previous: TrainConfig, current: TrainConfig) -> list[str]:
    """The keys, other than RESUMABLE ones, whose values differ between the run that made a checkpoint and the
    one resuming it."""
    before, after = dataclasses.asdict(previous), dataclasses.asdict(current)
    return sorted(key for key in before if key not in RESUMABLE and before[key] != after[key])


def to_toml(config: TrainConfig) -> str:
    """The config as TOML (flat keys), written next to checkpoints so a run records what it was."""
    lines = []
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, dict):
            inner = ", ".join(f'"{k}" = {float(v)!r}' for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        elif isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"
