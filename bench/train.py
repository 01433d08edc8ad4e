"""Training throughput and peak memory; prints one JSON line.

Cases (each in its own process, so each peak-memory figure is its own):
  tiny_unet      the tiny test UNet (training/tiny.py), batch 4, latents 32x32 (256 px), AdamW, 20 steps
  tiny_loop      `training.train.train` end to end on the tiny checkpoint: 64 px pairs, batch 4, 20 steps
                 (data, VAE, text encoder, dropout, EMA; setup time excluded by subtracting a 2-step run)
  sd15_ckpt      an SD1.5-size UNet (UNet2DConditionModel with SD1.5's config, in_channels 8, random weights),
                 256 px (latents 32x32), batch 1, AdamW, gradient checkpointing; the second step is timed
  sd15_no_ckpt   the same without gradient checkpointing (only with --no-checkpointing-too: it needs more memory)

Memory: peak RSS of the case's process (ru_maxrss); on CUDA also torch.cuda.max_memory_allocated.

    python bench/train.py [--steps 20] [--sd-steps 2] [--no-checkpointing-too] [--skip-sd]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_memory(device: str) -> dict:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, 3)}
    if device == "cuda":
        import torch

        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def unet_steps(unet, batch: int, latent: int, steps: int, text_dim: int, device: str) -> list[float]:
    """Times of `steps` training steps (forward, MSE, backward, AdamW) of an 8-channel UNet."""
    import torch

    unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        sample = torch.randn(batch, 8, latent, latent, generator=generator).to(device)
        text = torch.randn(batch, 77, text_dim, generator=generator).to(device)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        target = torch.randn(batch, 4, latent, latent, generator=generator).to(device)
        start = time.perf_counter()
        pred = unet(sample, timesteps, text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def case_tiny_unet(args: argparse.Namespace, device: str) -> dict:
    import torch

    from training.tiny import unet_for

    torch.manual_seed(0)
    unet = unet_for("tiny", in_channels=8)
    times = unet_steps(unet, 4, 32, args.steps + 2, unet.config.cross_attention_dim, device)[2:]  # 2 warm-ups
    per_step = sum(times) / len(times)
    return {
        "batch": 4,
        "px": 256,
        "steps": len(times),
        "s_per_step": round(per_step, 4),
        "samples_per_s": round(4 / per_step, 2),
        "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
    }


def case_tiny_loop(args: argparse.Namespace, device: str) -> dict:
    import datasets
    import numpy as np
    from PIL import Image

    from training.config import TrainConfig
    from training.tiny import build_tiny_checkpoint
    from training.train import train

    work = Path(tempfile.mkdtemp(prefix="itsd-bench-"))
    checkpoint = build_tiny_checkpoint(work / "tiny", seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
    datasets.Dataset.from_dict(
        {
            "input_image": images,
            "instruction": ["invert the colors"] * 8,
            "ground_truth_image": [Image.fromarray(255 - np.asarray(image)) for image in images],
        },
        features=datasets.Features(
            {
                "input_image": datasets.Image(),
                "instruction": datasets.Value("string"),
                "ground_truth_image": datasets.Image(),
            }
        ),
    ).save_to_disk(str(work / "data"))

    def run(steps: int, name: str) -> float:
        from accelerate.state import AcceleratorState, GradientState

        config = TrainConfig(
            pretrained=str(checkpoint),
            dataset=str(work / "data"),
            output_dir=str(work / name),
            resolution=64,
            train_batch_size=4,
            gradient_accumulation_steps=1,
            max_train_steps=steps,
            gradient_checkpointing=False,
            checkpointing_steps=0,
            validation_steps=0,
        )
        start = time.perf_counter()
        train(config)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return time.perf_counter() - start

    short = run(2, "short")
    full = run(args.steps + 2, "full")
    per_step = (full - short) / args.steps
    return {
        "batch": 4,
        "px": 64,
        "steps": args.steps,
        "s_per_step": round(per_step, 4),
        "samples_per_s": round(4 / per_step, 2),
        "setup_s": round(short, 2),
    }


def case_sd15(args: argparse.Namespace, device: str, checkpointing: bool) -> dict:
    import torch

    from training.tiny import unet_for

    torch.manual_seed(0)
    start = time.perf_counter()
    unet = unet_for("sd15", in_channels=8)  # SD1.5's UNet config (cross-attention 768), IP2P's 8 input channels
    build_s = time.perf_counter() - start
    if checkpointing:
        unet.enable_gradient_checkpointing()
    times = unet_steps(unet, 1, 32, args.sd_steps, unet.config.cross_attention_dim, device)
    timed = times[1:] or times  # the first step also allocates AdamW's state
    per_step = sum(timed) / len(timed)
    return {
        "batch": 1,
        "px": 256,
        "gradient_checkpointing": checkpointing,
        "steps": len(times),
        "step_times_s": [round(t, 2) for t in times],
        "s_per_step": round(per_step, 3),
        "samples_per_s": round(1 / per_step, 4),
        "build_s": round(build_s, 1),
        "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
    }


CASES = {
    "tiny_unet": case_tiny_unet,
    "tiny_loop": case_tiny_loop,
    "sd15_ckpt": lambda args, device: case_sd15(args, device, True),
    "sd15_no_ckpt": lambda args, device: case_sd15(args, device, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the tiny cases")
    parser.add_argument("--sd-steps", type=int, default=2, help="steps of the SD1.5-size cases (the 2nd+ are timed)")
    parser.add_argument("--no-checkpointing-too", action="store_true", help="also run SD1.5 without checkpointing")
    parser.add_argument("--skip-sd", action="store_true", help="only the tiny cases")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        result = CASES[args.case](args, device)
        print(json.dumps({**result, **peak_memory(device)}))
        return

    names = ["tiny_unet", "tiny_loop"]
    if not args.skip_sd:
        names.append("sd15_ckpt")
        if args.no_checkpointing_too:
            names.append("sd15_no_ckpt")
    results = {}
    for name in names:
        command = [
            sys.executable,
            __file__,
            "--case",
            name,
            "--steps",
            str(args.steps),
            "--sd-steps",
            str(args.sd_steps),
        ]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            results[name] = {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-400:]}
        else:
            results[name] = json.loads(lines[-1])
    print(
        json.dumps(
            {
                "bench": "train",
                "device": device,
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
