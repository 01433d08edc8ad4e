"""Seconds per image: the ONNX edit pipeline against the diffusers pipeline, same model, size and steps.

Builds an SD1.5-size InstructPix2Pix checkpoint with random weights (speed does not depend on the
weights), exports it with `itsd export`, then times both backends on one photo. Prints one JSON line.

    python bench/pipeline.py [--size 256] [--steps 20] [--images 1] [--preset sd15] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from core.edit import edit_image
from core.params import EditParams


def timed(backend, image, params, images):
    edit_image(backend, image, "Cartoonize the image", EditParams(steps=1, seed=0, max_side=params.max_side))  # warm-up
    start = time.perf_counter()
    for seed in range(images):
        edit_image(backend, image, "Cartoonize the image", EditParams(**{**params.to_dict(), "seed": seed}))
    return (time.perf_counter() - start) / images


def machine():
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and export here")
    args = parser.parse_args()

    import onnxruntime
    import torch

    from export.exporter import export_checkpoint
    from export.reference import TorchEditPipeline
    from training.tiny import build_tiny_checkpoint
    from worker.pipeline import OnnxEditPipeline

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
    params = EditParams(steps=args.steps, max_side=args.size)

    onnx = OnnxEditPipeline(artifacts, provider_names=("CPUExecutionProvider",))
    onnx_s = timed(onnx, image, params, args.images)
    onnx.timings.clear()  # the split comes from one more image, measured on its own, as a batch's first:
    onnx.encode_text.cache_clear()  # its text encoding included (later images reuse the cached embedding)
    start = time.perf_counter()
    edit_image(onnx, image, "Cartoonize the image", EditParams(**{**params.to_dict(), "seed": 0}))
    total = time.perf_counter() - start
    split = {k: round(v, 3) for k, v in onnx.timings.items() if k != "other"}
    split["other"] = round(total - sum(split.values()), 3)  # numpy loop, scheduler, resizing, tokenizing
    del onnx

    torch_backend = TorchEditPipeline.load(str(checkpoint))
    torch_s = timed(torch_backend, image, params, args.images)

    print(
        json.dumps(
            {
                "bench": "pipeline",
                "machine": machine(),
                "model": args.preset,
                "size": args.size,
                "steps": args.steps,
                "images": args.images,
                "onnx_s_per_image": round(onnx_s, 2),
                "torch_s_per_image": round(torch_s, 2),
                "speedup": round(torch_s / onnx_s, 2),
                "onnx_stage_s": split,
                "onnx_other_fraction": round(split.get("other", 0.0) / sum(split.values()), 4),
                "export_s": export_s,
                "onnxruntime": onnxruntime.__version__,
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
