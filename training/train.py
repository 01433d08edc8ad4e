"""Fine-tune InstructPix2Pix: `train(config)` is the whole run, read top to bottom; its named steps sit below it.

What one micro-batch's loss is lives in `training.objective`; data in `training.pairs`, models in
`training.models`, checkpoints in `training.checkpoints`, validation in `training.validation`.

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
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.params import read_edit_defaults
from training.checkpoints import STATE_FILE, find_checkpoint, save_checkpoint, save_final, write_edit_defaults
from training.config import ConfigError, TrainConfig, changed_for_resume, load_config, to_toml
from training.models import Models, Trained, load_models, parameters_of, task_head
from training.objective import Objective
from training.pairs import MixtureBatches, PairDataset, load_rows, row_weights
from training.validation import run_validation, validation_rows

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> list[float]:
    """Train as `cfg` says; returns the loss of each optimizer step this call ran (resumed runs: the rest)."""
    if not cfg.pretrained:
        raise ConfigError("no pretrained checkpoint: set `pretrained` (or --pretrained)")
    if not cfg.dataset:
        raise ConfigError("no dataset: set `dataset` (or --dataset)")
    rows, held_out = load_rows(cfg)  # before loading models: a bad dataset fails in a second, not a minute
    output_dir = Path(cfg.output_dir)
    accelerator, weight_dtype = start_accelerator(cfg)

    # ---- models: frozen parts in the compute dtype; the trained ones (UNet, maybe text encoder) stay fp32
    models = load_models(Path(cfg.pretrained))
    edit_defaults = cfg.final_edit_defaults() or read_edit_defaults(Path(cfg.pretrained))  # bad ones fail now
    if cfg.min_timestep >= models.noise_scheduler.config.num_train_timesteps:
        raise ConfigError(
            f"min_timestep {cfg.min_timestep} leaves no timestep to train on: the scheduler has "
            f"{models.noise_scheduler.config.num_train_timesteps}"
        )
    pairs = PairDataset(rows, cfg, models.tokenizer)
    trained = place_models(models, cfg, pairs.task_names, accelerator.device, weight_dtype)
    ema = make_ema(trained, cfg, accelerator.device)
    optimizer = make_optimizer(parameters_of(trained.modules()), cfg)

    # ---- data: a weighted mixture over tasks, step-keyed so that resuming replays nothing and skips nothing
    weights = row_weights(pairs.tasks, cfg.task_weights)
    validation = []
    if cfg.validation_steps and accelerator.is_main_process:
        validation = validation_rows(PairDataset(held_out, cfg, models.tokenizer), cfg.num_validation_rows)
    *prepared, optimizer = accelerator.prepare(*trained.modules(), optimizer)
    trained = trained.replaced(prepared)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    start_step = resume(accelerator, ema, cfg)
    batches = mixture_batches(pairs, weights, cfg, accelerator.process_index, start_step)
    objective = Objective(cfg, accelerator, models, trained, weight_dtype)
    writer = open_writer(accelerator, output_dir, cfg)
    log.info(
        "training %d steps from step %d: %d rows, tasks %s, %s precision on %s",
        cfg.max_train_steps,
        start_step,
        len(pairs),
        dict(Counter(pairs.tasks)),
        accelerator.mixed_precision,
        accelerator.device,
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
        step_loss = step_task_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.gradient_accumulation_steps):
            gen = step_generator(cfg.seed, step, micro, accelerator.process_index)
            loss, task_loss = objective(next(batches), gen, sync=micro == cfg.gradient_accumulation_steps - 1)
            step_loss = step_loss + loss / cfg.gradient_accumulation_steps
            step_task_loss = step_task_loss + task_loss / cfg.gradient_accumulation_steps
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters_of(trained.modules()), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(parameters_of(trained.modules()))

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
            with ema_weights(ema, parameters_of(trained.modules())):
                if accelerator.is_main_process:
                    run_validation(
                        accelerator.unwrap_model(trained.unet),
                        models,
                        models.vae,
                        accelerator.unwrap_model(objective.text_encoder),
                        validation,
                        cfg,
                        global_step,
                        writer,
                    )
            accelerator.wait_for_everyone()

    if losses and (not cfg.checkpointing_steps or cfg.max_train_steps % cfg.checkpointing_steps):
        save_checkpoint(accelerator, output_dir, cfg.max_train_steps, cfg.checkpoints_total_limit)  # to extend later
    save_product(accelerator, trained, ema, cfg, edit_defaults)
    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return losses


def start_accelerator(cfg: TrainConfig) -> tuple[Any, torch.dtype]:
    """The Accelerator with the config's mixed precision, the global RNGs seeded; and the frozen parts' dtype."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    set_seed(cfg.seed)  # torch/numpy/python global RNGs; our own draws use step-keyed generators
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, weight_dtype


def place_models(
    models: Models, cfg: TrainConfig, task_names: Sequence[str], device: torch.device, weight_dtype: torch.dtype
) -> Trained:
    """What is trained (with a new task head when `text_task_loss_weight`), in train mode on `device`; the frozen
    parts in eval mode, on `device`, in the compute dtype."""
    trained = Trained(
        models.unet,
        models.text_encoder if cfg.train_text_encoder else None,
        # trained with the rest, checkpointed with it, thrown away at the end
        task_head(models.text_encoder, task_names) if cfg.text_task_loss_weight else None,
    )
    for frozen in [models.vae] if cfg.train_text_encoder else [models.vae, models.text_encoder]:
        frozen.requires_grad_(False).eval().to(device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    for model in trained.modules():
        model.train().to(device)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    return trained


def make_ema(trained: Trained, cfg: TrainConfig, device: torch.device) -> Any | None:
    """The EMA of the trained weights when `use_ema`: made before prepare(), from the same (deterministic) weights
    on every process."""
    if not cfg.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(parameters_of(trained.modules()), decay=cfg.ema_decay)
    ema.to(device)
    return ema


def resume(accelerator: Any, ema: Any | None, cfg: TrainConfig) -> int:
    """Load the checkpoint `cfg.resume` names (training.checkpoints.find_checkpoint) into every prepared object;
    the step to go on from, 0 when there is none. A config that changed since the run that made the checkpoint
    (its OUTPUT_DIR/config.toml) in a key that changes the losses is named in a warning."""
    output_dir = Path(cfg.output_dir)
    checkpoint = find_checkpoint(output_dir, cfg.resume)
    if checkpoint is None:
        return 0
    accelerator.load_state(str(checkpoint))
    if ema is not None:
        ema.to(accelerator.device)  # load_state maps the EMA's tensors to the CPU
    step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
    log.info("resumed from %s at step %d", checkpoint, step)
    if (output_dir / "config.toml").is_file():
        try:
            changed = changed_for_resume(load_config(output_dir / "config.toml"), cfg)
        except ConfigError as exc:
            changed = [f"(the earlier config does not load: {exc})"]
        if changed:
            log.warning(
                "resuming with %s changed since the run that made %s: the losses will not be an uninterrupted run's",
                ", ".join(changed),
                checkpoint.name,
            )
    return step


def mixture_batches(
    pairs: PairDataset, weights: Sequence[float], cfg: TrainConfig, rank: int, start_step: int
) -> Iterator[dict]:
    """The micro-batches of steps `start_step`.. on process `rank`, drawn by task weight."""
    from torch.utils.data import DataLoader

    sampler = MixtureBatches(
        weights,
        cfg.train_batch_size,
        cfg.seed,
        rank,
        start_step,
        cfg.max_train_steps,
        cfg.gradient_accumulation_steps,
    )
    loader = DataLoader(pairs, batch_sampler=sampler, collate_fn=pairs.collate, num_workers=cfg.dataloader_num_workers)
    return iter(loader)


def open_writer(accelerator: Any, output_dir: Path, cfg: TrainConfig) -> Any | None:
    """On the main process: OUTPUT_DIR with the resolved config.toml, and a TensorBoard writer into logs/."""
    if not accelerator.is_main_process:
        return None
    from torch.utils.tensorboard import SummaryWriter

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.toml").write_text(to_toml(cfg))
    return SummaryWriter(str(output_dir / "logs"))


def save_product(
    accelerator: Any, trained: Trained, ema: Any | None, cfg: TrainConfig, edit_defaults: dict[str, float]
) -> None:
    """OUTPUT_DIR/final: a diffusers IP2P checkpoint (EMA weights when EMA is on) for `itsd export`."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    finals = trained.replaced([accelerator.unwrap_model(model) for model in trained.modules()])
    if ema is not None:
        ema.copy_to(parameters_of(finals.modules()))
    output_dir = Path(cfg.output_dir)
    final = save_final(
        finals.unet,
        Path(cfg.pretrained),
        output_dir / "final",
        finals.text_encoder,
        native_size=cfg.native_size or cfg.resolution,
    )
    write_edit_defaults(final, edit_defaults)
    log.info("saved %s", output_dir / "final")


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


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of one micro-batch on one process: same inputs, same draws, on any resume."""
    state = np.random.SeedSequence([seed, step, micro, rank, 1]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


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
