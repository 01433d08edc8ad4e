"""Seconds per image on CPU: every itsd runtime against diffusers' own pipeline, same model, image, size,
steps and seed, in one run.

Builds an SD1.5-size InstructPix2Pix checkpoint with random weights (speed does not depend on the
weights), exports it with `itsd export`, then times, on one photo:
- diffusers' StableDiffusionInstructPix2PixPipeline in fp32, and under `torch.autocast("cpu", bfloat16)`
  (what a CPU user picks instead of itsd);
- itsd's loop on ONNX Runtime (fp32), OpenVINO fp32, OpenVINO int8 and OpenVINO bf16 (static shapes, compiled
  before timing; int8 and bf16 through their PSNR gate, as a worker loads them: a refused one runs, and is
  named, as what the gate fell back to; int8's gate record is reported as `int8_gate`).
Then it runs 1, 2 and 4 jobs at once on the gated OpenVINO graph, their UNet calls batched together as a
`--batch-jobs` worker batches them (`worker.batching`), and reports images/s for each.
It reports the fastest itsd runtime's speed-up over both diffusers runs, each image's PSNR against
diffusers fp32; one UNet call of it against the CPU's bf16 matrix floor (the UNet's FLOPs, counted by
torch's FlopCounterMode, over the GFLOP/s of a large bf16 MatMul on OpenVINO); and ONNX Runtime's time
split by stage. Prints one JSON line.

    python bench/pipeline.py [--size 256] [--steps 20] [--images 1] [--preset sd15] [--scheduler euler]
                             [--batch-jobs 1,2,4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from core.edit import edit_image
from core.images import psnr, to_model_input
from core.params import EditParams

INSTRUCTION = "Cartoonize the image"


def timed(run, images: int) -> float:
    """Seconds per image of `run(seed)`, after one untimed run (compiles, caches, allocator warm-up)."""
    run(0)
    start = time.perf_counter()
    for seed in range(images):
        run(seed)
    return (time.perf_counter() - start) / images


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def bf16_matmul_gflops(side: int = 2048, repeats: int = 10) -> float:
    """The CPU's bf16 matrix throughput, as OpenVINO reaches it on one large MatMul."""
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([side, side], ov.Type.f32)
    b = ops.constant(np.random.default_rng(0).standard_normal((side, side)).astype(np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a])
    config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(model, "CPU", config)
    x = np.ones((side, side), np.float32)
    compiled(x)
    start = time.perf_counter()
    for _ in range(repeats):
        compiled(x)
    return 2 * side**3 * repeats / (time.perf_counter() - start) / 1e9


def unet_gflop(torch_backend, sample: np.ndarray, text: np.ndarray) -> float:
    """FLOPs of one UNet call with these inputs, as torch counts them (matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        torch_backend.pipe.unet(torch.from_numpy(sample), torch.tensor([500.0] * len(sample)), torch.from_numpy(text))
    return counter.get_total_flops() / 1e9


def batched_images_per_s(backend, image: Image.Image, params: EditParams, jobs: int) -> tuple[float, float]:
    """Images/s of `jobs` edits run at once on threads, their UNet calls batched (`worker.batching`), after
    a 3-step untimed round that compiles the batch's shapes; and the mean jobs per UNet call."""
    from worker.batching import BatchedBackend

    batched = BatchedBackend(backend)

    def job(seed: int, steps: int = params.steps) -> None:
        with batched.job():
            edit_image(batched, image, INSTRUCTION, EditParams(**{**params.to_dict(), "seed": seed, "steps": steps}))

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda seed: job(seed, 3), range(jobs)))
        batched.batcher.sizes.clear()
        start = time.perf_counter()
        list(pool.map(job, range(jobs)))
        seconds = time.perf_counter() - start
    return jobs / seconds, float(np.mean(batched.batcher.sizes))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--batch-jobs", default="1,2,4", help="jobs run at once, batched, comma-separated")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and export here")
    args = parser.parse_args()

    import onnxruntime
    import openvino
    import torch

    from core.settings import Settings
    from export.exporter import export_checkpoint
    from export.reference import TorchEditPipeline, diffusers_generate
    from training.tiny import build_tiny_checkpoint
    from worker.openvino_runtime import OpenVinoEditPipeline
    from worker.pipeline import OnnxEditPipeline
    from worker.runtimes import gated

    work = args.workdir or Path(tempfile.mkdtemp(prefix="itsd-bench-"))
    checkpoint, artifacts = work / f"{args.preset}-ckpt", work / f"{args.preset}-onnx"
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(checkpoint, preset=args.preset)
    export_s = None
    if not (artifacts / "manifest.json").exists():
        start = time.perf_counter()
        export_checkpoint(str(checkpoint), artifacts, verify_parity=False)
        export_s = round(time.perf_counter() - start, 1)

    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((args.size, args.size))
    # Euler, not the checkpoint's ancestral sampler: ancestral noise comes from torch's generator in diffusers
    # and numpy's in itsd, so images would differ by design and parity would measure nothing
    params = EditParams(steps=args.steps, max_side=args.size, scheduler=args.scheduler)
    figures: dict = {}
    outputs: dict[str, np.ndarray] = {}

    def itsd_run(name: str, backend) -> None:
        def run(seed: int) -> None:
            edit = edit_image(backend, image, INSTRUCTION, EditParams(**{**params.to_dict(), "seed": seed}))
            outputs[name] = np.asarray(edit.image)

        figures[name] = round(timed(run, args.images), 2)

    # diffusers, fp32 then bf16 autocast; the same initial latents as itsd's loop for a seed
    torch_backend = TorchEditPipeline.load(str(checkpoint))
    resolved = params.resolve(torch_backend.edit_defaults)
    pixels = to_model_input(np.asarray(image))
    for name, context in [
        ("diffusers_fp32", contextlib.nullcontext),
        ("diffusers_bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    ]:

        def run(seed: int, name: str = name, context=context, pipe=torch_backend) -> None:
            with context():
                outputs[name] = diffusers_generate(pipe, pixels, INSTRUCTION, resolved, seed)

        figures[name] = round(timed(run, args.images), 2)
    # one UNet call's inputs (batch 3: the guidance copies), and its FLOPs while torch's modules are loaded
    latent, channels = args.size // torch_backend.facts.vae_scale_factor, 2 * torch_backend.facts.latent_channels
    sample = np.random.default_rng(0).standard_normal((3, channels, latent, latent)).astype(np.float32)
    text = np.concatenate([torch_backend.encode_text(INSTRUCTION)] * 3)
    gflop = unet_gflop(torch_backend, sample, text)
    del torch_backend, run  # the last closure holds the pipeline too
    gc.collect()

    onnx = OnnxEditPipeline(artifacts, provider_names=("CPUExecutionProvider",))
    itsd_run("onnxruntime_fp32", onnx)
    onnx.timings.clear()  # the split comes from one more image, measured on its own, as a batch's first:
    onnx.encode_text.cache_clear()  # its text encoding included (later images reuse the cached embedding)
    start = time.perf_counter()
    edit_image(onnx, image, INSTRUCTION, EditParams(**{**params.to_dict(), "seed": 0}))
    total = time.perf_counter() - start
    split = {k: round(v, 3) for k, v in onnx.timings.items()}
    split["other"] = round(total - sum(split.values()), 3)  # numpy loop, scheduler, resizing, tokenizing
    del onnx
    gc.collect()

    cache = work / "cache"
    itsd_run("openvino_fp32", OpenVinoEditPipeline(artifacts, "fp32", cache))
    gc.collect()  # each runtime's graphs are freed before the next one's load
    int8 = gated(artifacts, "int8", Settings(cache_dir=cache))
    itsd_run(f"openvino_{int8.precision}_gated", int8)
    int8_gate = json.loads((cache / "openvino" / f"{int8.manifest.model_id}.int8.json").read_text())
    del int8
    gc.collect()
    bf16 = gated(artifacts, "bf16", Settings(cache_dir=cache))
    itsd_run(f"openvino_{bf16.precision}_gated", bf16)

    # one UNet call of the gated graph, against the matrix floor
    timestep = np.full((3,), 500.0, np.float32)
    bf16.predict_noise(sample, timestep, text)
    start = time.perf_counter()
    for _ in range(3):
        bf16.predict_noise(sample, timestep, text)
    unet_s = (time.perf_counter() - start) / 3
    peak = bf16_matmul_gflops()

    batching = {}
    for jobs in (int(n) for n in args.batch_jobs.split(",")):
        per_s, shared = batched_images_per_s(bf16, image, params, jobs)
        batching[str(jobs)] = {"images_per_s": round(per_s, 4), "jobs_per_unet_call": round(shared, 2)}

    itsd_names = [k for k in figures if not k.startswith("diffusers")]
    fastest = min(itsd_names, key=figures.get)
    print(
        json.dumps(
            {
                "bench": "pipeline",
                "machine": machine(),
                "model": args.preset,
                "size": args.size,
                "steps": args.steps,
                "scheduler": args.scheduler,
                "images": args.images,
                "s_per_image": figures,
                "fastest": fastest,
                "speedup_vs_diffusers_fp32": round(figures["diffusers_fp32"] / figures[fastest], 2),
                "speedup_vs_diffusers_bf16": round(figures["diffusers_bf16"] / figures[fastest], 2),
                "parity_db_vs_diffusers_fp32": {
                    name: round(psnr(outputs[name], outputs["diffusers_fp32"]), 1)
                    for name in figures
                    if name != "diffusers_fp32"
                },
                "int8_gate": int8_gate,
                "unet_call_s": round(unet_s, 3),
                "unet_gflop": round(gflop, 1),
                "bf16_matmul_gflops": round(peak, 1),
                "unet_over_floor": round(unet_s / (gflop / peak), 2),
                "batched_jobs": batching,
                "batched_gain_4_vs_1": round(batching["4"]["images_per_s"] / batching["1"]["images_per_s"], 2)
                if {"1", "4"} <= batching.keys()
                else None,
                "onnx_stage_s": split,
                "onnx_other_fraction": round(split["other"] / sum(split.values()), 4),
                "export_s": export_s,
                "onnxruntime": onnxruntime.__version__,
                "openvino": openvino.__version__,
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
