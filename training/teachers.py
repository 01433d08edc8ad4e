"""Teachers: whatever turns a photo into its edited target (uint8 HxWx3 RGB in, same size out).

- `cartoon`: a deterministic OpenCV cartoon filter (bilateral smoothing, an edge mask, colour quantization).
- `OnnxTeacher`: any ONNX image-to-image model, NCHW float input in [0, 1] or [-1, 1], on CPU.
- `CommandTeacher`: any program, run as `prog {input} {output}` on PNG files.
A teacher that fails on one photo raises `TeacherFailed`; the source skips that photo and reports why.
A target of another size is resized to the input's, so pairs stay pixel-aligned.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.errors import InvalidImage, InvalidParameters, PermanentError
from core.images import read_image_file

Teacher = Callable[[np.ndarray], np.ndarray]


class TeacherFailed(PermanentError):
    code = "teacher_failed"


@dataclass(frozen=True)
class CartoonFilter:
    bilateral_passes: int = 5  # repeated small bilateral filters flatten regions but keep edges
    bilateral_diameter: int = 9
    sigma_color: float = 30.0
    sigma_space: float = 7.0
    edge_block: int = 9  # adaptive threshold neighbourhood (odd): the scale of the ink lines
    edge_offset: int = 10  # higher: fewer lines, only the strong edges
    colors: int = 16  # palette size after quantization

    def __call__(self, image: np.ndarray) -> np.ndarray:
        smooth = image
        for _ in range(self.bilateral_passes):
            smooth = cv2.bilateralFilter(smooth, self.bilateral_diameter, self.sigma_color, self.sigma_space)
        grey = cv2.medianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 7)
        edges = cv2.adaptiveThreshold(
            grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, self.edge_block, self.edge_offset
        )
        flat = Image.fromarray(smooth).quantize(self.colors, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        return np.asarray(flat.convert("RGB")) & (edges[..., None] // 255 * 255)  # black ink where edges


cartoon = CartoonFilter()
# Tasks whose targets a built-in teacher makes from a clean photo: `itsd prepare --clean` can mix them in.
BUILTIN_TEACHERS: dict[str, Teacher] = {"cartoonization": cartoon}

# The value range the model's input expects, and how uint8 maps to it (and back).
RANGES = {"unit": (0.0, 1.0), "signed": (-1.0, 1.0)}


class OnnxTeacher:
    def __init__(self, model: Path, value_range: str = "unit") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise InvalidParameters("an ONNX teacher needs onnxruntime: pip install onnxruntime") from None
        try:
            self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise InvalidParameters(f"{model}: not a loadable ONNX model: {exc}") from None
        spec = self.session.get_inputs()[0]
        if len(spec.shape) != 4:
            raise InvalidParameters(f"{model}: expected an NCHW image input, got shape {spec.shape}")
        self.input_name = spec.name
        fixed = spec.shape[2:]  # a model with a fixed input size gets the photo resized to it, and back
        self.size = (fixed[1], fixed[0]) if all(isinstance(side, int) for side in fixed) else None
        self.low, self.high = RANGES[value_range]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        pixels = image if self.size is None else cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        x = pixels.astype(np.float32).transpose(2, 0, 1)[None] / 255.0 * (self.high - self.low) + self.low
        try:
            y = np.asarray(self.session.run(None, {self.input_name: x})[0])
        except Exception as exc:
            raise TeacherFailed(f"ONNX teacher failed: {exc}") from None
        if y.ndim != 4 or y.shape[1] != 3:
            raise TeacherFailed(f"ONNX teacher returned shape {y.shape}, expected [1, 3, H, W]")
        unit = (y[0].transpose(1, 2, 0) - self.low) / (self.high - self.low)
        out = np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)
        return match_size(out, width, height)


class CommandTeacher:
    """`template` holds `{input}` and `{output}`, e.g. "python cartoonize.py {input} {output}"."""

    def __init__(self, template: str, timeout_s: float = 300.0) -> None:
        self.argv = shlex.split(template)
        if not any("{input}" in a for a in self.argv) or not any("{output}" in a for a in self.argv):
            raise InvalidParameters(f"--teacher-command needs {{input}} and {{output}} placeholders: {template!r}")
        self.timeout_s = timeout_s

    def __call__(self, image: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="itsd-teacher-") as tmp:
            source, target = Path(tmp) / "input.png", Path(tmp) / "output.png"
            Image.fromarray(image).save(source)
            argv = [a.replace("{input}", str(source)).replace("{output}", str(target)) for a in self.argv]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
            except FileNotFoundError:
                raise InvalidParameters(f"teacher command not found: {argv[0]}") from None
            except subprocess.TimeoutExpired:
                raise TeacherFailed(f"teacher command timed out after {self.timeout_s:.0f} s") from None
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                raise TeacherFailed(f"teacher command exited {done.returncode}: {last}")
            if not target.is_file():
                raise TeacherFailed("teacher command wrote no output file")
            try:
                out = np.asarray(read_image_file(target))
            except InvalidImage as exc:
                raise TeacherFailed(f"teacher output unreadable: {exc}") from None
        return match_size(out, image.shape[1], image.shape[0])


def match_size(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))
