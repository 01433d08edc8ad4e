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
split by stage.

Then the modes that cut UNet evaluations (`modes`), each on OpenVINO fp32 (the fastest fp32 runtime on a CPU),
with its UNet evaluations (rows of every UNet call, counted), s/image and PSNR against diffusers' own pipeline
run in the same mode: `default` (3 copies every step), `image_guidance_1` (2 copies),
`guidance_until_0.4` (guidance on the first 40% of the steps, diffusers with the equivalent step-end
callback) and `lcm_4` (4 LCM steps, guidance 2, image guidance 1, on an export with a random LoRA fused
into the UNet, against diffusers with the same LoRA fused). Prints one JSON line.

    python bench/pipeline.py [--size 256] [--steps 20] [--images 1] [--preset sd15] [--scheduler euler]
                             [--batch-jobs 1,2,4] [--modes default,...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from core.edit import edit_image
from core.images import psnr, to_model_input
from core.params import EditParams

INSTRUCTION = "Cartoonize the image"
# Modes that cut UNet evaluations: edit params over the bench's own (--steps, guidance 7, image guidance 1.5)
MODES: dict[str, dict] = {
    "default": {},
    "image_guidance_1": {"image_guidance_scale": 1.0},
    "guidance_until_0.4": {"guidance_until": 0.4},
    "lcm_4": {"steps": 4, "guidance_scale": 2.0, "image_guidance_scale": 1.0, "scheduler": "lcm"},
}
LORA_MODES = ("lcm_4",)  # run on an export with a random LoRA fused into the UNet, against diffusers with it fused


def timed(run, images: int, warm=None) -> float:
    """Seconds per image of `run(seed)`, after one untimed `warm(0)` (compiles, caches, allocator warm-up; by
    default a whole `run`)."""
    (warm or run)(0)
    start = time.perf_counter()
    for seed in range(images):
        run(seed)
    return (time.perf_counter() - start) / images


def warm_up(backend, image: Image.Image, params: EditParams) -> None:
    """An untimed edit of up to 3 steps in `params`' mode: it compiles every UNet shape the mode calls (guided
    and, past a cutoff, unguided) and warms the allocator; `backend`'s count starts after it."""
    steps = min(params.steps or 3, 3)
    edit_image(backend, image, INSTRUCTION, replace(params, seed=0, steps=steps))
    backend.evaluations = 0


class CountingBackend:
    """A backend's model calls, counting UNet evaluations: the rows of every UNet call (tiles x copies)."""

    def __init__(self, inner) -> None:
        self.inner, self.evaluations = inner, 0
        self.facts, self.edit_defaults = inner.facts, inner.edit_defaults

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, text: np.ndarray) -> np.ndarray:
        self.evaluations += len(sample)
        return self.inner.predict_noise(sample, timestep, text)


def progress(line: str) -> None:
    """One line on stderr as each figure comes in (a run at 512 px takes about an hour)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def ratio(modes: dict, name: str, figure: str, inverse: bool = False) -> float | None:
    """`modes[name][figure]` over the default mode's (its inverse: a speed-up), None when the mode did not run."""
    if name not in modes:
        return None
    value = modes[name][figure] / modes["default"][figure]
    return round(1 / value if inverse else value, 3)


def fused_lora(work: Path, checkpoint: Path):
    """A random LoRA (rank 4, UNet only, as an LCM-LoRA) fused into `checkpoint`: diffusers' pipeline with it
    fused (`TorchEditPipeline`), and the export with it fused."""
    from export.checkpoint import load_pipeline
    from export.exporter import export_checkpoint
    from export.lora import fuse
    from export.reference import TorchEditPipeline
    from training.tiny import write_random_lora

    lora, exported = work / "random-lora.safetensors", work / f"{checkpoint.name}-lora-onnx"
    if not lora.exists():
        write_random_lora(checkpoint, lora)
    if not (exported / "manifest.json").exists():
        export_checkpoint(str(checkpoint), exported, loras=[(lora, 1.0)], verify_parity=False)
    pipe = load_pipeline(checkpoint)
    fuse(pipe, lora, 1.0)
    return TorchEditPipeline(pipe, {}), exported


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
    parser.add_argument("--modes", default=",".join(MODES), help="modes to run after the runtimes, comma-separated")
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
    from worker.runtimes import gated, native_bf16

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
    params = EditParams(steps=args.steps, max_side=args.size, scheduler=args.scheduler)
    figures: dict = {}
    outputs: dict[str, np.ndarray] = {}
    evaluations: dict[str, float] = {}

    def itsd_run(name: str, backend, params: EditParams = params, warmed=lambda backend: None) -> None:
        """Time `backend` in `params`' mode; `warmed(backend)` runs between the warm-up and the timed images."""
        counted = CountingBackend(backend)

        def run(seed: int) -> None:
            edit = edit_image(counted, image, INSTRUCTION, replace(params, seed=seed))
            outputs[name] = np.asarray(edit.image)

        def warm(seed: int) -> None:
            warm_up(counted, image, params)
            warmed(backend)

        figures[name] = round(timed(run, args.images, warm), 2)
        evaluations[name] = counted.evaluations / args.images
        progress(f"{name}: {figures[name]} s/image")

    # diffusers, fp32 then bf16 autocast; the same initial latents as itsd's loop for a seed. bf16 autocast only
    # where the CPU computes bf16 natively: elsewhere torch converts every operand (the tiny model, 128 px, 5
    # steps, on an AVX2 EPYC: 4.79 s against 0.50 s in fp32), and no CPU user would pick it
    torch_backend = TorchEditPipeline.load(str(checkpoint))
    resolved = params.resolve(torch_backend.edit_defaults)
    pixels = to_model_input(np.asarray(image))
    contexts = [("diffusers_fp32", contextlib.nullcontext)]
    if native_bf16():
        contexts.append(("diffusers_bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    for name, context in contexts:

        def run(seed: int, name: str = name, context=context, pipe=torch_backend, steps: int = resolved.steps) -> None:
            with context():
                outputs[name] = diffusers_generate(pipe, pixels, INSTRUCTION, replace(resolved, steps=steps), seed)

        figures[name] = round(timed(run, args.images, lambda seed, run=run: run(seed, steps=1)), 2)
        progress(f"{name}: {figures[name]} s/image")
    # one UNet call's inputs (batch 3: the guidance copies), and its FLOPs while torch's modules are loaded
    latent, channels = args.size // torch_backend.facts.vae_scale_factor, 2 * torch_backend.facts.latent_channels
    sample = np.random.default_rng(0).standard_normal((3, channels, latent, latent)).astype(np.float32)
    text = np.concatenate([torch_backend.encode_text(INSTRUCTION)] * 3)
    gflop = unet_gflop(torch_backend, sample, text)
    del torch_backend, run  # the last closure holds the pipeline too
    gc.collect()

    onnx = OnnxEditPipeline(artifacts, provider_names=("CPUExecutionProvider",))

    def fresh(backend) -> None:  # the split covers the timed images, the first as a batch's first: text encoding
        backend.timings.clear()  # included
        backend.encode_text.cache_clear()

    itsd_run("onnxruntime_fp32", onnx, warmed=fresh)
    split = {k: round(v / args.images, 3) for k, v in onnx.timings.items()}
    split["other"] = round(figures["onnxruntime_fp32"] - sum(split.values()), 3)  # numpy loop, scheduler, resizing
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
    if native_bf16():
        bf16 = gated(artifacts, "bf16", Settings(cache_dir=cache))
        itsd_run(f"openvino_{bf16.precision}_gated", bf16)
    else:  # OpenVINO would run fp32 under bf16's name: a second fp32 run, skipped
        bf16 = OpenVinoEditPipeline(artifacts, "fp32", cache)

    # one UNet call of the bf16 graph (fp32 without native bf16), against the bf16 matrix floor
    timestep = np.full((3,), 500.0, np.float32)
    bf16.predict_noise(sample, timestep, text)
    start = time.perf_counter()
    for _ in range(3):
        bf16.predict_noise(sample, timestep, text)
    unet_s = (time.perf_counter() - start) / 3
    peak = bf16_matmul_gflops()

    batching = {}
    for jobs in (int(n) for n in args.batch_jobs.split(",") if n):
        per_s, shared = batched_images_per_s(bf16, image, params, jobs)
        batching[str(jobs)] = {"images_per_s": round(per_s, 4), "jobs_per_unet_call": round(shared, 2)}

    del bf16
    gc.collect()

    itsd_names = [k for k in figures if not k.startswith("diffusers")]
    fastest = min(itsd_names, key=figures.get)

    def mode(name: str, reference: str, diffusers_s: float) -> dict:
        return {
            "unet_evaluations": evaluations[name],
            "s_per_image": figures[name],
            "parity_db": round(psnr(outputs[name], outputs[reference]), 1),
            "diffusers_s_per_image": round(diffusers_s, 2),
        }

    # the modes, on OpenVINO fp32; `default` is the runtimes' own run (the same params)
    modes = {"default": mode("openvino_fp32", "diffusers_fp32", figures["diffusers_fp32"])}
    wanted = [name for name in args.modes.split(",") if name in MODES and name != "default"]
    for lora in (False, True):
        names = [name for name in wanted if (name in LORA_MODES) == lora]
        if not names:
            continue
        reference, exported = (
            fused_lora(work, checkpoint) if lora else (TorchEditPipeline.load(str(checkpoint)), artifacts)
        )
        backend = OpenVinoEditPipeline(exported, "fp32", cache)
        for name in names:
            mode_params = replace(params, **MODES[name])
            itsd_run(name, backend, mode_params)
            start = time.perf_counter()
            resolved = mode_params.resolve(reference.edit_defaults)
            outputs[f"diffusers_{name}"] = diffusers_generate(reference, pixels, INSTRUCTION, resolved, args.images - 1)
            modes[name] = mode(name, f"diffusers_{name}", time.perf_counter() - start)
            progress(f"mode {name}: {modes[name]}")
            del figures[name]
        del reference, backend
        gc.collect()
    modes["fastest_precision"] = {"runtime": fastest, **mode(fastest, "diffusers_fp32", figures["diffusers_fp32"])}
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
                "speedup_vs_diffusers_bf16": round(figures["diffusers_bf16"] / figures[fastest], 2)
                if "diffusers_bf16" in figures
                else None,
                "parity_db": round(psnr(outputs[fastest], outputs["diffusers_fp32"]), 1),
                "modes": modes,
                "lcm_4_evaluations_vs_default": ratio(modes, "lcm_4", "unet_evaluations"),
                "lcm_4_speedup_vs_default": ratio(modes, "lcm_4", "s_per_image", inverse=True),
                "image_guidance_1_evaluations_vs_default": ratio(modes, "image_guidance_1", "unet_evaluations"),
                "guidance_until_0.4_evaluations_vs_default": ratio(modes, "guidance_until_0.4", "unet_evaluations"),
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
