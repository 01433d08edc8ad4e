"""Check itsd-tiny against the bar of its issue, with the rows' own instructions and with phrasings that no
training paraphrase used.

    python -m training.recipes.itsd_tiny_check DATA-TEST ARTIFACTS --out DIR [edit options]

Runs `itsd evaluate` on each task's rows (`--task T`) with the rows' own instructions and with every task's
UNSEEN phrasing (`--instruction TEXT`), and prints three tables. The bar: PSNR gain over the degraded input (for
cartoonization: over the input's distance to the teacher's output), with the rows' own instructions and with the
task's unseen phrasing; and the unseen phrasing picks the task: on the task's rows it scores higher than any other
task's unseen phrasing (a model that ignores the instruction ties, and misses). The confusion table has every
task's rows against every unseen phrasing. A third table says where the text encoder puts each unseen phrasing:
its cosine to each task's training paraphrases (mean token states); a phrasing that picks another task usually
sits nearer that task's paraphrases; then how many VALIDATION phrasings sit nearest their own task's paraphrases
(text only: for choosing a recipe without the test phrasings). Exit status 1 if a row misses the bar.
Also writes DIR/itsd-tiny.jpg: the first held-out row of each task, input | output | target.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image, ImageDraw

from core.params import EditParams
from producer.options import edit_options
from training.evaluate import EvaluationSpec, evaluate_models
from training.evaluation_report import GRID_HEADER, GRID_TILE
from training.templates import load_templates

# Phrasings that are no line of training/instructions/<task>.txt (tests/test_itsd_tiny.py checks it).
UNSEEN = {
    "low_light": "The lights were off when I shot this, could you lift the shadows so we can see it?",
    "denoise": "Please clean up the sensor speckle, it looks like sandpaper",
    "derain": "The storm left wet streaks all over my shot, please wipe them away",
    "deblur": "My hands shook when I took this, please steady it and sharpen the details",
    "cartoonization": "Redraw this as a flat-colour comic panel with bold ink outlines",
}
# Phrasings for choosing a recipe: no training line, not in the bar, never evaluated on images; only where the
# text encoder puts them (nearest task's paraphrases) is reported, so a recipe can be judged without the test rows'
# phrasings above.
VALIDATION = {
    "low_light": [
        "It is far too dim, turn up the exposure",
        "Recover this underexposed night shot",
        "Make the dark room visible",
        "I took this at dusk and everything is murky, can you light it up",
    ],
    "denoise": [
        "Smooth away the noisy pixels",
        "This photo is full of static, clean it",
        "The picture is grainy from the high ISO, tidy it up",
        "Too much speckle here, make it smooth",
    ],
    "derain": [
        "Take the raindrops off this picture",
        "Erase the drizzle from the scene",
        "It was pouring when I shot this, take out the streaks",
        "Remove the rainfall so the street looks dry",
    ],
    "deblur": [
        "This is out of focus, fix it",
        "Undo the camera shake",
        "Bring the soft picture into focus",
        "Everything is smeared because the car was moving, make it crisp",
    ],
    "cartoonization": [
        "Turn this into a cartoon drawing",
        "Make it look like an animated film still",
        "Give it a comic book look",
        "Paint this like a Saturday morning animation with thick outlines",
    ],
}
# Minimum PSNR gain (dB) over the input; 0 = it must be positive (closer to the target than the input is).
BAR_DB = {"low_light": 3.0, "denoise": 2.0, "derain": 0.0, "deblur": 0.0, "cartoonization": 0.0}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def unseen_words(task: str, text: str) -> list[str]:
    """Words of `text` that appear in none of the task's training paraphrases."""
    seen = set().union(*(words(line) for line in load_templates(task)))
    return sorted(words(text) - seen)


def gains(metrics: Path, model: str) -> dict[str, dict[str, float]]:
    report = json.loads(metrics.read_text())
    return {
        task: {"gain_db": s["models"][model]["gain_db"], "psnr": s["models"][model]["psnr"], "count": s["count"]}
        for task, s in report["tasks"].items()
    }


def figure(out: Path, tasks: list[str]) -> Path:
    """One picture of the first held-out row of each task, input | output | target (cut from the grids)."""
    label = 16
    canvas = Image.new("RGB", (3 * GRID_TILE, len(tasks) * (GRID_TILE + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, task in enumerate(tasks):
        grid = Image.open(out / f"own-{task}" / "grids" / f"{task}.png").convert("RGB")
        top = i * (GRID_TILE + label)
        draw.text((4, top + 2), f"{task}: input | itsd-tiny | target", fill="black")
        canvas.paste(grid.crop((0, GRID_HEADER, 3 * GRID_TILE, GRID_HEADER + GRID_TILE)), (0, top + label))
    canvas.save(out / "itsd-tiny.jpg", quality=85)
    return out / "itsd-tiny.jpg"


def placement(artifacts: Path, phrasings: list[str]) -> list[dict[str, float]]:
    """Each phrasing -> task -> cosine between its text-encoder state and the task's training paraphrases' (each
    the mean over token positions; the paraphrases' states averaged)."""
    from worker.pipeline import OnnxEditPipeline

    pipe = OnnxEditPipeline(artifacts, ("CPUExecutionProvider",))

    def state(texts: list[str]) -> np.ndarray:
        means = np.stack([pipe.encode_text(text)[0].astype(np.float64).mean(0) for text in texts])
        return means / np.linalg.norm(means, axis=1, keepdims=True)

    centres = {task: state(load_templates(task)).mean(0) for task in UNSEEN}
    return [{task: float(v @ c / np.linalg.norm(c)) for task, c in centres.items()} for v in state(phrasings)]


def nearest(cosines: dict[str, float]) -> str:
    return max(cosines, key=cosines.__getitem__)


def check_task(base: EvaluationSpec, out: Path, task: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Score `task`'s rows with their own instructions and with every task's unseen phrasing: the task's two
    results against the bar, and its row of the confusion table (unseen phrasing of each task -> gain dB)."""
    evaluate_models(replace(base, tasks=(task,)), out / f"own-{task}", progress=False)
    own = gains(out / f"own-{task}" / "metrics.json", "tiny")[task]
    said: dict[str, dict[str, float]] = {}
    for other, phrase in UNSEEN.items():
        folder = out / f"{task}-said-{other}"
        evaluate_models(replace(base, tasks=(task,), instruction=phrase), folder, progress=False)
        said[other] = gains(folder / "metrics.json", "tiny")[task]
    confusion = {other: figures["gain_db"] for other, figures in said.items()}
    runner_up = max((other for other in UNSEEN if other != task), key=confusion.__getitem__)
    results: list[dict[str, Any]] = []
    for kind, figures, instruction in (("own", own, "(the row's)"), ("unseen", said[task], UNSEEN[task])):
        passed = figures["gain_db"] > BAR_DB[task] if BAR_DB[task] == 0 else figures["gain_db"] >= BAR_DB[task]
        results.append({"task": task, "instruction": instruction, "kind": kind, "bar_db": BAR_DB[task]} | figures)
        if kind == "unseen":  # the margin over the best other task's phrasing on these rows
            results[-1] |= {"runner_up": runner_up, "margin_db": figures["gain_db"] - confusion[runner_up]}
            passed = passed and results[-1]["margin_db"] > 0
        results[-1]["passed"] = passed
    return results, confusion


def matrix(corner: str, rows: dict[str, dict[str, float]], fmt: str) -> list[str]:
    """A Markdown table of task -> task -> figure, tasks across in UNSEEN's order."""
    lines = [f"| {corner} | " + " | ".join(UNSEEN) + " |", "|---" * (len(UNSEEN) + 1) + "|"]
    return lines + [
        f"| {task} | " + " | ".join(format(row[o], fmt) for o in UNSEEN) + " |" for task, row in rows.items()
    ]


def tables(
    results: list[dict[str, Any]],
    confusion: dict[str, dict[str, float]],
    cosines: dict[str, dict[str, float]],
    validation: dict[str, list[str]],
) -> str:
    """The bar table, the confusion table and the text encoder's placement of the unseen phrasings, in Markdown;
    then how many validation phrasings sit nearest their own task (`validation`: task -> nearest of each)."""
    lines = ["| task | instruction | rows | PSNR | gain dB | bar | picks the task | pass |", "|---" * 8 + "|"]
    for r in results:
        bar = f"> {r['bar_db']:.0f}" if r["bar_db"] == 0 else f">= {r['bar_db']:.0f}"
        picks = f"{r['margin_db']:+.2f} dB over {r['runner_up']}" if "margin_db" in r else ""
        lines.append(
            f"| {r['task']} | {r['instruction']} | {r['count']} | {r['psnr']:.2f} | {r['gain_db']:+.2f} | {bar} | "
            f"{picks} | {'yes' if r['passed'] else 'NO'} |"
        )
    lines += ["", "Gain (dB) of each task's rows (down) with each task's unseen phrasing (across):", ""]
    lines += matrix("rows", confusion, "+.2f")
    lines += ["", "Text encoder (mean token state): cosine of each unseen phrasing to each task's paraphrases:", ""]
    lines += matrix("phrasing", cosines, ".2f")
    wrong = [f"{task} -> {near}" for task, nears in validation.items() for near in nears if near != task]
    placed = sum(len(nears) for nears in validation.values()) - len(wrong)
    lines += ["", f"Validation phrasings nearest their own task's paraphrases: {placed}/{placed + len(wrong)}"]
    lines += [f"(misplaced: {', '.join(wrong)})"] if wrong else []
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option("--rows-per-task", type=click.IntRange(1), help="Evaluate only the first N rows of each task.")
@edit_options
def main(dataset: Path, artifacts: Path, out: Path, rows_per_task: int | None, params: EditParams) -> None:
    """Evaluate ARTIFACTS on DATASET's test split with its own and with unseen instructions, against the bar."""
    base = EvaluationSpec(dataset, {"tiny": str(artifacts)}, params, limit=rows_per_task)  # seed: 0 when unset
    results: list[dict[str, Any]] = []
    confusion: dict[str, dict[str, float]] = {}  # task's rows -> unseen phrasing of task -> gain dB
    for task in UNSEEN:
        task_results, confusion[task] = check_task(base, out, task)
        results += task_results
    figure(out, list(UNSEEN))
    phrasings = [*UNSEEN.values(), *(text for texts in VALIDATION.values() for text in texts)]
    found = iter(placement(artifacts, phrasings))
    cosines = {task: next(found) for task in UNSEEN}
    validation = {task: [nearest(next(found)) for _ in texts] for task, texts in VALIDATION.items()}
    report = {"params": params.to_dict(), "results": results, "confusion_gain_db": confusion}
    report |= {"unseen_phrasing_cosine": cosines, "validation_phrasing_nearest": validation}
    (out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = tables(results, confusion, cosines, validation)
    (out / "check.md").write_text(markdown)
    click.echo(markdown)
    if not all(r["passed"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
