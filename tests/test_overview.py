"""The whole photo decides, the tiles bring the detail (core.overview), on stand-in models whose decision
depends on what they see, and through real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.edit import Tiling, edit_image
from core.errors import InvalidParameters
from core.images import psnr
from core.overview import ENLARGE, FADE, SHRINK, TOLERANCE, global_view, merge, resize, view_size
from core.params import EditParams, check_edit_defaults
from core.standin import StandInModel
from tests.conftest import photo

UNGUIDED = EditParams(steps=1, seed=0)


def brighten_what_looks_dark(x: np.ndarray) -> np.ndarray:
    """A model that decides from what it sees: each view (a tile, or the whole image) whose mean is dark is
    brightened 3x; a view that looks normal is left as it is."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    unit = (x + 1.0) / 2.0
    return np.where(mean < -0.4, np.clip(unit * 3.0, 0, 1) * 2.0 - 1.0, x)


def normal_photo_with_a_dark_corner(width: int = 640, height: int = 448) -> Image.Image:
    """Mid-grey texture with a dark region bigger than a 64-px tile, as a dark wall or dark hair is."""
    rng = np.random.default_rng(0)
    pixels = np.clip(150 + rng.normal(0, 20, (height, width, 3)), 0, 255)
    pixels[: height // 2, : width // 3] *= 0.15
    return Image.fromarray(pixels.astype(np.uint8))


def block_means(image: Image.Image, block: int = 64) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64).mean(axis=2)
    rows, columns = pixels.shape[0] // block, pixels.shape[1] // block
    return pixels[: rows * block, : columns * block].reshape(rows, block, columns, block).mean(axis=(1, 3))


def test_a_tile_never_decides_alone_every_block_follows_the_whole_photos_decision():
    """Tiles alone brighten the dark corner into a bright rectangle; with the global view the photo, which is
    not dark, is left as it is in every block, and its texture (the tiles' detail) is kept."""
    model, image = StandInModel(transform=brighten_what_looks_dark), normal_photo_with_a_dark_corner()
    whole = edit_image(model, image, "brighten", UNGUIDED, Tiling(size=640))  # one view: the photo's decision
    tiles_alone = edit_image(model, image, "brighten", UNGUIDED, Tiling(overview=False))
    both = edit_image(model, image, "brighten", UNGUIDED)
    assert whole.tiles == 1 and both.tiles == tiles_alone.tiles > 40
    assert np.abs(block_means(tiles_alone.image) - block_means(whole.image)).max() > 40  # the measure can fail
    assert np.abs(block_means(both.image) - block_means(whole.image)).max() < 8  # the tolerance, and the blur's
    # spread at the dark region's edge (one view pixel is 10 px here)
    smooth = edit_image(model, image, "brighten", EditParams(steps=1, seed=0, detail=0))
    kept, blurred = (psnr(np.asarray(e.image), np.asarray(image)) for e in (both, smooth))
    assert kept > 35 and kept > blurred + 10  # the texture is the input's (in the dark region, at the tiles' gain)


def test_a_model_that_changes_nothing_changes_nothing_through_the_merge():
    """The stand-in returns its input: the global view agrees with the tiles, and every pixel's detail stays."""
    image = photo(300, 190, seed=3)
    edit = edit_image(StandInModel(), image, "x", UNGUIDED)
    assert edit.tiles > 1
    assert np.abs(np.asarray(edit.image).astype(int) - np.asarray(image).astype(int)).max() <= 1


def test_detail_zero_gives_the_whole_view_enlarged_and_one_all_of_the_tiles_detail():
    image = photo(320, 200, seed=4)
    sharp, smooth = (edit_image(StandInModel(), image, "x", EditParams(steps=1, seed=0, detail=d)) for d in (1, 0))

    def fine(picture: Image.Image) -> float:  # what is finer than a pixel of the 64-px view (5 px here)
        pixels = np.asarray(picture, np.float32).transpose(2, 0, 1)
        return float(np.abs(pixels - resize(resize(pixels, 40, 64, SHRINK), 200, 320, ENLARGE)).mean())

    assert psnr(np.asarray(sharp.image), np.asarray(image)) > psnr(np.asarray(smooth.image), np.asarray(image)) + 6
    assert fine(smooth.image) < fine(image) / 4 and fine(sharp.image) > fine(image) * 0.9


def test_the_merge_takes_the_view_where_it_disagrees_and_the_tiles_everywhere_else():
    """Tiles 0.3 brighter than the view in one region (a decision: far over TOLERANCE + FADE) and slightly off
    elsewhere (jitter between scales, under the tolerance): the region is the view's, its detail too (the
    tiles made theirs under their own decision); the rest stays the tiles', every pixel."""
    rng = np.random.default_rng(5)
    tiled = (rng.normal(0, 0.1, (3, 256, 384)) + 0.02).astype(np.float32)
    tiled[:, :128, :128] += 0.3
    small = view_size(256, 384, 64)
    whole = np.pad(resize(tiled, *small, SHRINK) - 0.02, ((0, 0), (0, 64 - small[0]), (0, 0)))
    whole[:, :21, :21] -= 0.3
    merged = merge(tiled.copy(), whole, 64)
    region = (slice(None), slice(16, 100), slice(16, 100))
    enlarged = resize(whole[:, : small[0]], 256, 384, ENLARGE)
    np.testing.assert_allclose(merged[region], enlarged[region], atol=1e-5)
    assert TOLERANCE + FADE < 0.3 and merged[region].std() < tiled[region].std() / 3
    np.testing.assert_allclose(merged[:, 160:, 200:], tiled[:, 160:, 200:], atol=1e-5)  # agreement: the tiles'


def test_the_global_view_is_the_image_shrunk_to_one_tile_aspect_kept_mirrored_to_the_latent_grid():
    pixels = np.linspace(-1, 1, 3 * 96 * 400, dtype=np.float32).reshape(1, 3, 96, 400)
    view = global_view(pixels, 128)
    assert view.shape == (1, 3, 64, 128) and view_size(96, 400, 128) == (31, 128)
    np.testing.assert_array_equal(view[0, :, 31:62], view[0, :, 30::-1][:, :31])  # the mirror
    assert view_size(20032, 320, 256) == (256, 4) and view_size(1, 5000, 64) == (1, 64)  # never 0 px


def test_detail_is_an_edit_parameter_a_model_may_default_and_must_be_0_to_1():
    assert EditParams().resolve({}).detail == 1.0 and EditParams().resolve({"detail": 0.5}).detail == 0.5
    assert check_edit_defaults({"detail": 0.25}, "x") == {"detail": 0.25}
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(InvalidParameters, match="detail"):
            EditParams(detail=bad)


def test_the_progress_counts_every_model_call_of_both_views():
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))

    edit = edit_image(StandInModel(), photo(300, 190), "x", EditParams(steps=3, seed=0), Tiling(batch=2), progress)
    assert edit.tiles == 28  # 7 x 4 tiles: 28 encodes, 3 steps x 14 batches, 28 decodes; the view: 1 + 3 + 1
    assert calls[-1] == (103, 103) and len(calls) == 103


def test_an_image_of_one_tile_is_one_view(tiny_artifacts):
    """Nothing changes for an image that fits one tile: the global view would be the same image."""
    from worker.pipeline import OnnxEditPipeline

    onnx, image = OnnxEditPipeline(tiny_artifacts), photo(192, 128, seed=6)
    with_view, without = (edit_image(onnx, image, "x", UNGUIDED, Tiling(overview=o)) for o in (True, False))
    assert with_view.tiles == 1 and np.array_equal(np.asarray(with_view.image), np.asarray(without.image))


@pytest.mark.slow
def test_the_bundled_model_brightens_a_dark_2_mp_photo_as_the_whole_photo_decides(tmp_path):
    """itsd-tiny, its defaults, a held-out photo enlarged to 2 MP and darkened: tiles alone each decide how dark
    their piece is and stray far from the whole-photo edit (the photo at native size, enlarged); the default
    stays within 12 levels of it in every 128-px block, and closer to the clean photo than tiles alone."""
    from export.exporter import export_checkpoint
    from producer.models import BUNDLED_MODEL
    from training.degrade import low_light
    from training.recipes.photos import PHOTOS
    from worker.pipeline import OnnxEditPipeline

    export_checkpoint(str(BUNDLED_MODEL), tmp_path / "onnx", verify_parity=False)
    model = OnnxEditPipeline(tmp_path / "onnx")
    clean = np.asarray(Image.fromarray(PHOTOS["chelsea"]()).resize((1731, 1151), Image.Resampling.BICUBIC))
    settings = {"gamma": 1.8, "gain": 0.3, "photons": 500.0, "read_noise": 0.005}
    dark = low_light(clean.astype(np.float32) / 255.0, settings, np.random.default_rng(0))
    image = Image.fromarray(np.clip(np.round(dark * 255.0), 0, 255).astype(np.uint8))
    instruction, params = "Brighten this dark photo", EditParams(seed=0)
    whole = edit_image(model, image, instruction, EditParams(seed=0, max_side=256)).image
    alone = edit_image(model, image, instruction, params, Tiling(overview=False)).image
    default = edit_image(model, image, instruction, params).image

    def luminance(picture: Image.Image) -> np.ndarray:
        return block_means(Image.fromarray(np.asarray(picture.convert("L"))).convert("RGB"), 128)

    assert np.abs(luminance(alone) - luminance(whole)).max() > 30
    assert np.abs(luminance(default) - luminance(whole)).max() < 12
    assert psnr(np.asarray(default), clean) > psnr(np.asarray(alone), clean)
