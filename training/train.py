"""Fine-tune InstructPix2Pix: `train(config)` is the whole loop, read top to bottom; helpers sit beside it.

The model learns to predict the noise (or v) added to the *edited* image's latents, given the noisy latents
concatenated with the *input* image's latents (8 UNet input channels) and the instruction's text embedding.
With probability p per sample the text is replaced by the empty prompt's embedding, the image latents are
zeroed, or both (diffusers' `train_instruct_pix2pix.py`), so the model also learns the unconditional
predictions that classifier-free guidance needs at inference.

Reproducibility: every random draw of a step (rows by task weight, crop boxes, flips, paraphrases, VAE
sampling noise, diffusion noise, timesteps, dropout) comes from a generator seeded by (seed, step,
micro-batch, process). The data sampler's state is therefore the step number, which each checkpoint records
next to the model, optimizer, EMA and RNG states that `accelerator.save_state` writes, so a resumed run
continues with exactly the losses the uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from core.errors import InvalidModel
from core.params import EDIT_DEFAULTS_FILE, read_edit_defaults
from training.config import ConfigError, TrainConfig, to_toml
from training.dataset import Crop, aligned_crop, as_pil
from training.templates import load_templates

log = logging.getLogger(__name__)

STATE_FILE = "itsd_state.json"  # inside each checkpoint: the step (= the data sampler's state)


def train(cfg: TrainConfig) -> list[float]:
    """Train as `cfg` says; returns the loss of each optimizer step this call ran (resumed runs: the rest)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader

    if not cfg.pretrained:
        raise ConfigError("no pretrained checkpoint: set `pretrained` (or --pretrained)")
    if not cfg.dataset:
        raise ConfigError("no dataset: set `dataset` (or --dataset)")
    rows, held_out = load_rows(cfg)  # before loading models: a bad dataset fails in a second, not a minute
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    set_seed(cfg.seed)  # torch/numpy/python global RNGs; our own draws use step-keyed generators
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    # ---- models: frozen parts in the compute dtype; the trained ones (UNet, maybe text encoder) stay fp32

    models = load_models(Path(cfg.pretrained))
    edit_defaults = cfg.final_edit_defaults() or read_edit_defaults(Path(cfg.pretrained))  # bad ones fail now
    tokenizer, text_encoder, vae, unet, noise_scheduler = (
        models.tokenizer,
        models.text_encoder,
        models.vae,
        models.unet,
        models.noise_scheduler,
    )
    if cfg.min_timestep >= noise_scheduler.config.num_train_timesteps:
        raise ConfigError(
            f"min_timestep {cfg.min_timestep} leaves no timestep to train on: the scheduler has "
            f"{noise_scheduler.config.num_train_timesteps}"
        )
    pairs = PairDataset(rows, cfg, tokenizer)
    trained = [unet, text_encoder] if cfg.train_text_encoder else [unet]
    if cfg.text_task_loss_weight:  # trained with the rest, checkpointed with it, thrown away at the end
        trained.append(task_head(text_encoder, pairs.task_names))
    for frozen in [vae] if cfg.train_text_encoder else [vae, text_encoder]:
        frozen.requires_grad_(False).eval().to(device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    for model in trained:
        model.train().to(device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = None
    if cfg.use_ema:  # made before prepare(), from the same (deterministic) weights on every process
        ema = EMAModel(parameters_of(trained), decay=cfg.ema_decay)
        ema.to(device)
    optimizer = make_optimizer(parameters_of(trained), cfg)

    # ---- data: a weighted mixture over tasks, step-keyed so that resuming replays nothing and skips nothing
    weights = row_weights(pairs.tasks, cfg.task_weights)
    validation = []
    if cfg.validation_steps and accelerator.is_main_process:
        validation = validation_rows(PairDataset(held_out, cfg, tokenizer), cfg.num_validation_rows)

    *trained, optimizer = accelerator.prepare(*trained, optimizer)
    unet = trained[0]
    if cfg.train_text_encoder:
        text_encoder = trained[1]
    head = trained[2] if cfg.text_task_loss_weight else None  # task_head, as prepared
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    start_step = 0
    checkpoint = find_checkpoint(output_dir, cfg.resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if ema is not None:
            ema.to(device)  # load_state maps the EMA's tensors to the CPU
        start_step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
        log.info("resumed from %s at step %d", checkpoint, start_step)

    batches = iter(
        DataLoader(
            pairs,
            batch_sampler=MixtureBatches(
                weights,
                cfg.train_batch_size,
                cfg.seed,
                accelerator.process_index,
                start_step,
                cfg.max_train_steps,
                cfg.gradient_accumulation_steps,
            ),
            collate_fn=pairs.collate,
            num_workers=cfg.dataloader_num_workers,
        )
    )
    null_ids = tokenize(tokenizer, [""]).to(device)  # the empty prompt's embedding replaces dropped instructions
    with torch.no_grad():
        null_text = text_encoder(null_ids, return_dict=False)[0]

    writer = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(to_toml(cfg))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "logs"))
    log.info(
        "training %d steps from step %d: %d rows, tasks %s, %s precision on %s",
        cfg.max_train_steps,
        start_step,
        len(pairs),
        dict(Counter(pairs.tasks)),
        accelerator.mixed_precision,
        device,
    )

    # ---- the loop
    losses = []
    progress = tqdm(
        range(start_step, cfg.max_train_steps),
        initial=start_step,
        total=cfg.max_train_steps,
        unit="step",
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    for step in progress:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_task_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            gen = step_generator(cfg.seed, step, micro, accelerator.process_index)
            latents, image_latents, text = encode_batch(batch, vae, text_encoder, gen, weight_dtype)
            loss_weights = sample_weights(
                cfg.loss_weighting,
                latents,
                image_latents * vae.config.scaling_factor,
                cfg.input_error_floor,
                cfg.input_error_ceiling,
            )
            if cfg.train_text_encoder:  # a trained encoder moves the empty prompt's embedding too
                null_text = text_encoder(null_ids, return_dict=False)[0]
            task_logits = head(text.mean(1)) if head is not None else None
            noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
            timesteps = draw_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, cfg, gen)
            timesteps = timesteps.to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            text, image_latents = conditioning_dropout(
                text, image_latents, null_text, cfg.conditioning_dropout_prob, gen
            )
            target = training_target(noise_scheduler, latents, noise, timesteps)
            last = micro == cfg.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(*trained):  # sync grads once per step
                pred = unet(torch.cat([noisy, image_latents], dim=1), timesteps, text, return_dict=False)[0]
                errors = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
                loss = (errors * loss_weights).mean()
                total = loss
                if task_logits is not None:
                    task_loss = F.cross_entropy(task_logits.float(), batch["task"].to(device))
                    total = loss + cfg.text_task_loss_weight * task_loss
                    step_task_loss += task_loss.detach() / cfg.gradient_accumulation_steps
                accelerator.backward(total / cfg.gradient_accumulation_steps)
            step_loss += loss.detach() / cfg.gradient_accumulation_steps
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters_of(trained), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(parameters_of(trained))

        global_step = step + 1
        loss_value = accelerator.reduce(step_loss, reduction="mean").item()
        losses.append(loss_value)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if writer is not None:
            writer.add_scalar("train/loss", loss_value, global_step)
            writer.add_scalar("train/lr", lr, global_step)
            if cfg.text_task_loss_weight:
                writer.add_scalar("train/text_task_loss", accelerator.reduce(step_task_loss).item(), global_step)
        if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
        if cfg.validation_steps and global_step % cfg.validation_steps == 0:
            with ema_weights(ema, parameters_of(trained)):
                if accelerator.is_main_process:
                    run_validation(
                        accelerator.unwrap_model(unet),
                        models,
                        vae,
                        accelerator.unwrap_model(text_encoder),
                        validation,
                        cfg,
                        global_step,
                        writer,
                    )
            accelerator.wait_for_everyone()

    if losses and (not cfg.checkpointing_steps or cfg.max_train_steps % cfg.checkpointing_steps):
        save_checkpoint(accelerator, output_dir, cfg.max_train_steps, cfg.checkpoints_total_limit)  # to extend later

    # ---- the product: a diffusers IP2P checkpoint (EMA weights when EMA is on) for `itsd export`
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finals = [accelerator.unwrap_model(model) for model in trained]
        if ema is not None:
            ema.copy_to(parameters_of(finals))
        final = save_final(
            finals[0],
            Path(cfg.pretrained),
            output_dir / "final",
            *finals[1:2],
            native_size=cfg.native_size or cfg.resolution,
        )
        write_edit_defaults(final, edit_defaults)
        if writer is not None:
            writer.close()
        log.info("saved %s", output_dir / "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return losses


# ---------------------------------------------------------------- models


@dataclass
class Models:
    tokenizer: object  # CLIPTokenizer
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler built from the checkpoint's scheduler config (training noise)
    sampling_scheduler: object  # the scheduler validation and final/ use


def load_models(pretrained: Path, with_unet: bool = True) -> Models:
    """Load a diffusers checkpoint folder; a 4-channel (SD) UNet gets `conv_in` widened to 8 channels.

    Validation and final/ sample with the checkpoint's own scheduler, except that an SD source gets
    EulerAncestralDiscreteScheduler (what timbrooks/instruct-pix2pix ships) built from its config.
    """
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet_config = pretrained / "unet" / "config.json"
    if not unet_config.is_file():
        raise InvalidModel(f"{pretrained}: not a diffusers checkpoint folder (no unet/config.json)")
    in_channels = json.loads(unet_config.read_text()).get("in_channels")
    if in_channels not in (4, 8):
        raise InvalidModel(f"{pretrained}: UNet has {in_channels} input channels; expected 8 (IP2P) or 4 (SD)")
    unet: torch.nn.Module = torch.nn.Identity()
    if with_unet:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
        if in_channels == 4:
            log.info("%s has a 4-channel UNet (Stable Diffusion): widening conv_in to 8 channels", pretrained)
            unet = widen_conv_in(unet)
    scheduler_config = DDPMScheduler.load_config(pretrained, subfolder="scheduler")
    sampling_cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    if in_channels == 4 or sampling_cls is None:
        sampling_cls = EulerAncestralDiscreteScheduler
    return Models(
        tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae"),
        unet=unet,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        sampling_scheduler=sampling_cls.from_config(scheduler_config),
    )


def widen_conv_in(unet: torch.nn.Module, in_channels: int = 8) -> torch.nn.Module:
    """Give an SD UNet the extra input channels IP2P needs: new channels zero, old weights and bias copied.

    Deterministic (no random init), so every process builds the same model; with the extra inputs at zero
    the widened UNet computes exactly what the original did. (diffusers' script leaves the bias random:
    diffusers issue 4960.)
    """
    old = unet.conv_in
    new = torch.nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def task_head(text_encoder: torch.nn.Module, tasks: Sequence[str]) -> torch.nn.Module:
    """The linear classifier of `text_task_loss_weight`: the text encoder's mean token state -> one logit per task."""
    if len(tasks) < 2:
        raise ConfigError(f"text_task_loss_weight needs rows of at least two tasks (the dataset has {list(tasks)})")
    return torch.nn.Linear(text_encoder.config.hidden_size, len(tasks))


def parameters_of(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters of every trained module, in one fixed order (optimizer, EMA and clipping agree)."""
    return [param for module in modules for param in module.parameters()]


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError("use_8bit_adam needs bitsandbytes (CUDA): pip install bitsandbytes") from None
        cls = bitsandbytes.optim.AdamW8bit
    return cls(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant, cosine or linear."""
    if step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_scheduler == "constant":
        return cfg.learning_rate
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.max_train_steps - cfg.lr_warmup_steps)
    if cfg.lr_scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate * (1.0 - progress)


def resolve_mixed_precision(value: str) -> str:
    """`auto`: bf16 on a CUDA GPU that has it, else fp16 on CUDA, else fp32 ("no") on CPU."""
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# ---------------------------------------------------------------- per-step helpers


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch on one process: same inputs, same draws, on any resume."""
    state = np.random.SeedSequence([seed, step, micro, rank, 1]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def tokenize(tokenizer: object, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_batch(
    batch: dict, vae: torch.nn.Module, text_encoder: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target latents sampled and scaled by the VAE's scaling factor, input-image latents from the VAE's
    mode and not scaled, as the IP2P pipeline makes them at inference; instruction embeddings, with their
    graph when the text encoder is being trained)."""
    device = vae.device
    with torch.no_grad():
        edited = batch["edited"].to(device, dtype)
        original = batch["original"].to(device, dtype)
        latents = vae.encode(edited).latent_dist.sample(generator) * vae.config.scaling_factor
        image_latents = vae.encode(original).latent_dist.mode()
    with torch.set_grad_enabled(text_encoder.training):
        text = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
    return latents, image_latents, text


def draw_timesteps(count: int, total: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """`count` timesteps from [min_timestep, total): uniform, or with the latest `timestep_bias_portion` of the
    range drawn `timestep_bias_multiplier` times as often (diffusers' "later" timestep bias)."""
    if cfg.timestep_bias_multiplier == 1.0:
        return torch.randint(cfg.min_timestep, total, (count,), generator=gen)
    weights = torch.ones(total - cfg.min_timestep)
    weights[len(weights) - max(1, round(cfg.timestep_bias_portion * len(weights))) :] *= cfg.timestep_bias_multiplier
    return cfg.min_timestep + torch.multinomial(weights, count, replacement=True, generator=gen)


def training_target(
    noise_scheduler: object, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict, by the scheduler's `prediction_type`: the noise, the velocity, or the
    clean latents themselves ("sample")."""
    kind = noise_scheduler.config.prediction_type
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    if kind == "epsilon":
        return noise
    raise ValueError(f"unsupported prediction_type {kind!r}: epsilon, v_prediction or sample")


def sample_weights(
    weighting: str, latents: torch.Tensor, input_latents: torch.Tensor, floor: float, ceiling: float = 0.0
) -> torch.Tensor:
    """Per-sample loss weights: ones ("uniform"), or 1 / the mean squared error of the input's latents (scaled as
    the target's) against the target's, clamped to [floor, ceiling] (no ceiling if 0) ("input_error"): the identity
    edit then scores 1 on every sample whose input error lies between them."""
    if weighting == "uniform":
        return torch.ones(latents.shape[0], device=latents.device)
    error = (input_latents.float() - latents.float()).pow(2).mean((1, 2, 3))
    return 1.0 / error.clamp(min=floor, max=ceiling or None)


def conditioning_dropout(
    text: torch.Tensor, image_latents: torch.Tensor, null_text: torch.Tensor, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample r ~ U[0,1): r < 2p drops the text (empty-prompt embedding), p <= r < 3p zeroes the image
    latents; so p each of text only, both, image only (diffusers' train_instruct_pix2pix.py)."""
    r = torch.rand(text.shape[0], generator=generator).to(text.device)
    drop_text = (r < 2 * prob).reshape(-1, 1, 1)
    keep_image = ~((r >= prob) & (r < 3 * prob))
    text = torch.where(drop_text, null_text.to(text.dtype), text)
    image_latents = image_latents * keep_image.reshape(-1, 1, 1, 1).to(image_latents.dtype)
    return text, image_latents


@contextlib.contextmanager
def ema_weights(ema: object | None, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Swap the EMA weights into the trained parameters for the duration (validation), then put them back."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


# ---------------------------------------------------------------- data


def load_rows(cfg: TrainConfig) -> tuple[object, object]:
    """(training rows, validation rows) of the `save_to_disk` folder, checked for the needed columns.

    A DatasetDict gives its `train_split`, and its `validation_split` when that has rows; a plain Dataset
    (or a DatasetDict without validation rows) validates on training rows.
    """
    import datasets

    try:
        data = datasets.load_from_disk(cfg.dataset)
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
        except (FileNotFoundError, ValueError):
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


# ---------------------------------------------------------------- checkpoints and outputs


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else []:
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`resume` "" -> None; "latest" -> the newest checkpoint in output_dir (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log.warning("resume=latest but %s has no checkpoint: starting from scratch", output_dir)
            return None
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume: {path} is not a checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator: object, output_dir: Path, step: int, total_limit: int) -> Path:
    """Full training state (UNet, optimizer, grad scaler, RNGs, EMA, step) into output_dir/checkpoint-<step>,
    first deleting the oldest checkpoints so at most `total_limit` remain (0 = keep all)."""
    path = output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process and total_limit > 0:
        existing = [p for s, p in list_checkpoints(output_dir) if s != step]
        for old in existing[: max(0, len(existing) - (total_limit - 1))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    return path


def build_pipeline(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, models: Models
) -> object:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=models.tokenizer,
        unet=unet,
        scheduler=models.sampling_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_final(
    unet: torch.nn.Module,
    pretrained: Path,
    out: Path,
    text_encoder: torch.nn.Module | None = None,
    native_size: int | None = None,
) -> Path:
    """The diffusers IP2P checkpoint folder (safetensors): the trained UNet (and text encoder, when it was
    trained) with fp32 frozen parts reloaded from `pretrained`, so nothing passes through a half-precision
    round trip. The UNet's sample size records `native_size` (px, stored in latents): the tile side that
    export writes into the manifest and that large images are edited in."""
    fresh = load_models(pretrained, with_unet=False)
    if native_size is not None:
        vae_scale = 2 ** (len(fresh.vae.config.block_out_channels) - 1)
        unet.register_to_config(sample_size=native_size // vae_scale)
    for model in (unet, text_encoder):
        if model is not None and model.dtype != torch.float32:
            model.to(dtype=torch.float32)
    pipe = build_pipeline(unet, fresh.vae, text_encoder or fresh.text_encoder, fresh)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_edit_defaults(checkpoint: Path, defaults: dict[str, float]) -> None:
    """The checkpoint's recommended steps and guidance scales (core.params), when there are any."""
    if defaults:
        (checkpoint / EDIT_DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")


def validation_rows(pairs: PairDataset, count: int) -> list[tuple[Image.Image, Image.Image, str]]:
    """`count` rows spread evenly over the dataset, centre-cropped, with their own instruction text."""
    indices = sorted(set(np.linspace(0, len(pairs) - 1, num=min(count, len(pairs))).round().astype(int)))
    return [pairs.pair(int(index), None) for index in indices]


@torch.no_grad()
def run_validation(
    unet: torch.nn.Module,
    models: Models,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    rows: list[tuple[Image.Image, Image.Image, str]],
    cfg: TrainConfig,
    step: int,
    writer: object | None,
) -> Path:
    """Edit the validation inputs with the current weights; save a grid (input | output | target per row)
    under output_dir/validation/ and log it to TensorBoard."""
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(unet, vae, text_encoder, models)
    pipe.set_progress_bar_config(disable=True)
    device = unet.device
    autocast = torch.autocast(device.type, dtype=vae.dtype) if vae.dtype != torch.float32 else contextlib.nullcontext()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    res = cfg.resolution
    grid = Image.new("RGB", (3 * res, len(rows) * res))
    with autocast:
        for i, (original, target, instruction) in enumerate(rows):
            edited = pipe(
                instruction,
                image=original,
                num_inference_steps=cfg.validation_inference_steps,
                guidance_scale=cfg.validation_guidance_scale,
                image_guidance_scale=cfg.validation_image_guidance_scale,
                generator=generator,
            ).images[0]
            for column, image in enumerate((original, edited, target)):
                grid.paste(image.resize((res, res)), (column * res, i * res))
    unet.train(was_training)
    out = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    if writer is not None:
        writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        writer.add_text("validation/instructions", "\n\n".join(row[2] for row in rows), step)
    return out
