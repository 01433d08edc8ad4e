"""Full-resolution editing: tile placement and weights, and the tiled loop through real ONNX sessions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.edit import Tiling, edit_image, generate, initial_latents, plan
from core.errors import InvalidOutput
from core.images import psnr, to_model_input, to_uint8
from core.params import EditParams
from core.schedulers import make_scheduler
from core.standin import StandInModel
from core.tiles import Axis, Layout
from tests.conftest import photo
from worker.pipeline import OnnxEditPipeline

PARAMS = EditParams(steps=2, seed=3, scheduler="euler")


@pytest.fixture(scope="module")
def onnx(tiny_artifacts):
    return OnnxEditPipeline(tiny_artifacts)


@pytest.mark.parametrize("length", [1, 7, 32, 33, 63, 100, 257, 1000, 2501])
@pytest.mark.parametrize(("size", "overlap"), [(32, 8), (64, 16), (8, 2), (5, 4)])
def test_tiles_cover_every_cell_evenly_spaced_clamped_to_the_edges_with_the_overlap_asked(length, size, overlap):
    axis = Axis.plan(length, size, overlap)
    covered = np.zeros(length, dtype=int)
    for start in axis.starts:
        covered[start : start + axis.size] += 1
    assert covered.min() >= 1
    assert axis.size == min(size, length) and axis.starts[0] == 0 and axis.starts[-1] + axis.size == length
    steps = np.diff(axis.starts)
    if len(steps):
        assert steps.max() - steps.min() <= 1  # evenly spread
        assert axis.size - steps.max() >= min(overlap, axis.size - 1)  # neighbours share at least the overlap


@pytest.mark.parametrize(("height", "width", "tile"), [(24, 40, 8), (100, 37, 32), (16, 16, 32), (90, 2000, 64)])
def test_blend_weights_are_positive_and_sum_to_one_at_every_cell(height, width, tile):
    layout = Layout.plan(height, width, tile)
    total = np.zeros((height, width), dtype=np.float64)
    for t in layout.tiles:
        assert t.weight.min() > 0
        t.window(total)[...] += t.weight
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_a_tile_ramps_only_towards_its_neighbours_and_is_flat_on_the_images_border():
    axis = Axis.plan(100, 40, 10)
    first, last = axis.weights[0], axis.weights[-1]
    assert first[0] == 1.0 and last[-1] == 1.0  # nothing else covers the border: full weight
    assert first[-1] < 0.1 and last[0] < 0.1  # a tile's inner edge, where it sees least context, counts least
    assert np.all(np.diff(first[first < 1]) < 0)  # a smooth ramp, no step


def untiled_reference(backend, pixels, instruction, params, seed):
    """InstructPix2Pix as diffusers writes it, with no tiles: one call of each model on the whole image."""
    image = backend.encode_image(pixels)
    text, empty = backend.encode_text(instruction), backend.encode_text("")
    scheduler = make_scheduler(backend.facts.scheduler_config, params.scheduler)
    scheduler.set_timesteps(params.steps)
    rng = np.random.default_rng(seed)
    latents = initial_latents(rng, image.shape) * np.float32(scheduler.init_noise_sigma)
    for index, t in enumerate(scheduler.timesteps):
        batch = scheduler.scale_model_input(np.concatenate([latents] * 3), index)
        sample = np.concatenate([batch, np.concatenate([image, image, np.zeros_like(image)])], axis=1)
        predicted = backend.predict_noise(sample, np.full(3, t, np.float32), np.concatenate([text, empty, empty]))
        ti, io, ne = predicted.astype(np.float64)  # the loop sums the copies in float64 (core.edit._guide)
        guided = ne + params.guidance_scale * (ti - io) + params.image_guidance_scale * (io - ne)
        latents = scheduler.step(guided[None].astype(np.float32), index, latents, rng)
    return to_uint8(backend.decode(latents / backend.facts.latent_scaling_factor)[0])


def test_an_image_that_fits_one_tile_edits_bit_identical_to_the_untiled_pipeline(onnx):
    image = photo(192, 128, seed=4)
    params = EditParams(steps=3, seed=5).resolve({})
    edit = edit_image(onnx, image, "Cartoonize the image", params)
    expected = untiled_reference(onnx, to_model_input(np.asarray(image)), "Cartoonize the image", params, 5)
    assert edit.tiles == 1 and np.array_equal(np.asarray(edit.image), expected)


def test_torch_and_onnx_give_the_same_tiled_image(tiny_checkpoint, onnx):
    from export.reference import TorchEditPipeline

    torch_backend = TorchEditPipeline.load(tiny_checkpoint)
    image, tiling = photo(384, 320, seed=6), Tiling(size=128)
    ours, theirs = (edit_image(b, image, "Cartoonize the image", PARAMS, tiling) for b in (onnx, torch_backend))
    assert ours.tiles == theirs.tiles == 12  # 4 columns x 3 rows of 128-px tiles
    assert psnr(np.asarray(ours.image), np.asarray(theirs.image)) >= 40.0


def test_tile_batches_change_no_pixel_beyond_rounding(onnx):
    image = photo(384, 320, seed=7)
    one, four = (edit_image(onnx, image, "x", PARAMS, Tiling(size=128, batch=b)) for b in (1, 4))  # 12 = 3 x 4
    five = edit_image(onnx, image, "x", PARAMS, Tiling(size=128, batch=5))  # a padded last batch
    assert psnr(np.asarray(one.image), np.asarray(four.image)) >= 45.0
    assert psnr(np.asarray(one.image), np.asarray(five.image)) >= 45.0


def seam_ratio(output: np.ndarray, reference: np.ndarray, edges: list[int]) -> float:
    """Mean error next to tile edges over the mean error elsewhere, along columns."""
    error = np.abs(output.astype(np.float64) - reference.astype(np.float64)).mean(axis=(0, 2))
    near = np.zeros(error.shape, dtype=bool)
    for edge in edges:
        near[max(edge - 1, 0) : edge + 1] = True
    return float(error[near].mean() / error[~near].mean())


def test_a_4x3_tile_image_through_onnx_shows_no_seam_where_tiles_meet(onnx):
    """The error against the one-tile edit of the same image is no larger at tile edges than elsewhere;
    tiles abutting with no overlap (the naive cut) show their edges, so the measure can fail."""
    image = photo(384, 320, seed=8)
    params = PARAMS.resolve(onnx.edit_defaults)
    pixels = to_model_input(np.asarray(image))
    whole = generate(onnx, pixels, "x", params, 3, plan(onnx.facts, 320, 384, Tiling(size=384)))
    layout = plan(onnx.facts, 320, 384, Tiling(size=128))
    tiled = generate(onnx, pixels, "x", params, 3, layout)
    naive_layout = Layout(Axis(40, 16, (0, 16, 24)), Axis(48, 16, (0, 16, 32)))  # abutting columns: edges at 16, 32
    naive = generate(onnx, pixels, "x", params, 3, naive_layout)
    scale = onnx.facts.vae_scale_factor
    edges = sorted({e * scale for s in layout.columns.starts[1:] for e in (s, s + 1)})
    ends = [(s + layout.columns.size) * scale for s in layout.columns.starts[:-1]]
    tiled_ratio = seam_ratio(tiled, whole, edges + ends)
    naive_ratio = seam_ratio(naive, whole, [128, 256])
    assert len(layout) == 12 and tiled_ratio < 1.5, tiled_ratio
    assert naive_ratio > tiled_ratio, (naive_ratio, tiled_ratio)


@pytest.mark.parametrize(
    ("width", "height", "tiles"),
    [
        pytest.param(20000, 300, 208, marks=pytest.mark.slow),  # padded to 20032 x 320: 2 x 104 tiles of 256 px
        (3000, 70, 16),  # padded to 3008 x 128: 1 x 16
        (1, 1, 1),
        (17, 9, 1),
    ],
)
def test_panoramas_and_images_smaller_than_a_tile_come_back_at_their_size(onnx, width, height, tiles):
    image = photo(width, height, seed=9)
    edit = edit_image(onnx, image, "x", EditParams(steps=1, seed=0))
    assert edit.image.size == (width, height) and edit.working_size == (width, height)
    assert edit.tiles == tiles


def test_the_loop_blends_a_stand_in_models_tiles_back_into_its_exact_output():
    """A model that returns its input: whatever the tiling, blending with weights that sum to one gives the
    input back (to 1/255), the padding cropped away and nothing shifted."""
    image = photo(150, 70, seed=10)
    for tiling in (Tiling(size=64), Tiling(size=32, batch=3), Tiling(size=256)):
        edit = edit_image(StandInModel(), image, "x", EditParams(steps=3, seed=0), tiling)
        diff = np.abs(np.asarray(edit.image).astype(int) - np.asarray(image).astype(int))
        assert diff.max() <= 1, (tiling, diff.max())


def test_max_side_shrinks_first_and_the_output_is_resized_back():
    image = Image.fromarray(np.full((300, 400, 3), 90, np.uint8))
    edit = edit_image(StandInModel(), image, "x", EditParams(steps=1, seed=0, max_side=200))
    assert edit.working_size == (200, 150) and edit.image.size == (400, 300)


def test_a_model_that_outputs_nan_fails_the_edit_instead_of_writing_black():
    broken = StandInModel(transform=lambda x: np.full_like(x, np.nan))
    with pytest.raises(InvalidOutput, match="NaN"):
        edit_image(broken, photo(100, 70), "x", EditParams(steps=1, seed=0))
