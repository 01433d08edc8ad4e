"""Image rules: decoding, orientation, colour modes, size limits and the working size."""

from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pytest
from PIL import ExifTags, Image

from core.errors import ImageTooLarge, InputNotFound, InvalidImage
from core.images import (
    decode_image,
    encode_image,
    pad_to_multiple,
    psnr,
    read_image_file,
    to_model_input,
    to_uint8,
    working_size,
)
from core.metadata import METADATA
from tests.conftest import photo
from tests.photos import CAPTION, INKS, LENS, MAKE, MODEL, TAKEN, caption, cmyk_profile, save_camera_photo


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_decodes_to_8bit_rgb(mode):
    source = photo(40, 30).convert("RGBA" if mode == "RGBA" else "RGB")
    if mode in ("I;16", "I", "F"):
        grey = np.asarray(source.convert("L"), dtype=np.float64)
        scale = 257 if mode != "F" else 1
        image = Image.fromarray((grey * scale).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        data = encoded(image, "TIFF") if mode in ("F", "I") else encoded(image)
    else:
        image = source.convert(mode)
        data = encoded(image, "JPEG" if mode == "CMYK" else "PNG")
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode in ("I;16", "I", "F"):  # 16-bit and float are rescaled, not clipped to white
        assert psnr(np.asarray(out)[..., 0], np.asarray(source.convert("L"))) > 30


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(encoded(rgba)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    image = photo(60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encoded(image, "JPEG", exif=exif))
    assert out.size == (20, 60)


@pytest.mark.parametrize("data", [b"", b"not an image at all", encoded(photo())[:200]])
def test_undecodable_bytes_raise_invalid_image(data):
    with pytest.raises(InvalidImage):
        decode_image(data)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match="over the limit"):
        decode_image(encoded(Image.new("RGB", (400, 300))), max_pixels=100_000)


def test_a_fifo_or_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait forever for a writer
    with pytest.raises(InvalidImage, match="not a regular file"):
        read_image_file(tmp_path / "pipe.png")
    (tmp_path / "big.png").write_bytes(encoded(photo(64, 64)))
    with pytest.raises(ImageTooLarge, match="over the input limit of 100"):
        read_image_file(tmp_path / "big.png", max_bytes=100)


def test_a_missing_file_is_input_not_found(tmp_path):
    with pytest.raises(InputNotFound):
        read_image_file(tmp_path / "nope.png")


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((4000, 3000), None, (4000, 3000)),  # the default: the input's own size
        ((512, 512), 512, (512, 512)),
        ((451, 300), 512, (451, 300)),  # never enlarged
        ((4000, 3000), 512, (512, 384)),
        ((3000, 4000), 768, (576, 768)),
        ((20000, 300), 512, (512, 8)),  # a strip keeps its shape: it is padded, never stretched
        ((20000, 3), 512, (512, 1)),
    ],
)
def test_working_size_keeps_the_input_size_or_shrinks_it_keeping_aspect(size, max_side, expected):
    assert working_size(*size, max_side) == expected


@pytest.mark.parametrize(("width", "height"), [(1, 1), (17, 9), (64, 64), (100, 70), (300, 20000)])
def test_padding_mirrors_out_to_the_grid_and_keeps_the_image_in_the_top_left(width, height):
    image = photo(width, height)
    padded = pad_to_multiple(image, (width, height), 64)
    assert padded.shape == (-(-height // 64) * 64, -(-width // 64) * 64, 3)
    assert np.array_equal(padded[:height, :width], np.asarray(image))
    if padded.shape[1] > width:  # the first padded column mirrors the last real one
        assert np.array_equal(padded[:height, width], np.asarray(image)[:, -1])


def test_model_input_round_trips_through_uint8():
    image = photo(64, 64)
    pixels = to_model_input(np.asarray(image))
    assert pixels.shape == (1, 3, 64, 64) and pixels.dtype == np.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert np.array_equal(to_uint8(pixels[0]), np.asarray(image))


@pytest.mark.parametrize("name", ["a.jpg", "b.PNG", "c.webp", "d.unknown"])
def test_outputs_are_encoded_in_the_format_their_name_says(name):
    data = encode_image(photo(), name)
    fmt = Image.open(io.BytesIO(data)).format
    assert fmt == {"a.jpg": "JPEG", "b.PNG": "PNG", "c.webp": "WEBP", "d.unknown": "PNG"}[name]


def icc_profile(space: str = "sRGB") -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile(space)).tobytes()


@pytest.mark.parametrize("name", ["a.jpg", "b.png", "c.webp", "d.tiff"])
def test_an_output_keeps_its_sources_icc_profile_and_alpha_where_its_format_has_one(name):
    rgba = photo(30, 20).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((30, 20)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    source = decode_image(encoded(rgba, "PNG", icc_profile=icc_profile(), exif=exif))
    edited = Image.fromarray(255 - np.asarray(source))  # what an edit gives back: plain RGB, no metadata
    out = Image.open(io.BytesIO(encode_image(edited, name, source=source)))
    assert out.size == (20, 30) and out.info.get("icc_profile") == icc_profile()
    assert out.getexif().get(0x0112, 1) == 1  # the orientation is applied
    if name == "a.jpg":
        assert out.mode == "RGB"
    else:
        assert out.mode == "RGBA"
        expected = np.asarray(rgba.getchannel("A").transpose(Image.Transpose.ROTATE_270))
        assert np.array_equal(np.asarray(out.getchannel("A")), expected)
    plain = Image.open(io.BytesIO(encode_image(edited, name)))
    assert plain.mode == "RGB" and "icc_profile" not in plain.info


def xmp_of(image: Image.Image) -> bytes:
    return image.info.get("xmp") or b""


@pytest.mark.parametrize("source_name", ["a.jpg", "b.png", "c.webp", "d.tiff"])
@pytest.mark.parametrize("name", ["o.jpg", "o.png", "o.webp", "o.tiff"])
def test_an_output_keeps_its_sources_exif_xmp_and_iptc_upright_and_without_the_thumbnail(tmp_path, source_name, name):
    save_camera_photo(photo(30, 20), tmp_path / source_name)
    source = read_image_file(tmp_path / source_name)
    out = Image.open(io.BytesIO(encode_image(Image.fromarray(255 - np.asarray(source)), name, source=source)))
    exif = out.getexif()
    assert out.size == (20, 30) and exif[0x0112] == 1  # upright pixels, orientation 1
    assert (exif[ExifTags.Base.Make], exif[ExifTags.Base.Model]) == (MAKE, MODEL)
    taken = exif.get_ifd(ExifTags.IFD.Exif)
    assert (taken[ExifTags.Base.DateTimeOriginal], taken[ExifTags.Base.LensModel]) == (TAKEN, LENS)
    assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
    assert not exif.get_ifd(ExifTags.IFD.IFD1)  # no thumbnail of the unedited photo
    assert b"<dc:title>" in xmp_of(out) and b'tiff:Orientation="6"' not in xmp_of(out)
    if name in ("o.jpg", "o.tiff") and source_name in ("a.jpg", "d.tiff"):  # the formats that carry IPTC
        assert caption(out) == CAPTION


@pytest.mark.parametrize("name", ["o.jpg", "o.png", "o.webp", "o.tiff"])
def test_strip_gps_drops_only_the_location_and_strip_metadata_drops_it_all(tmp_path, name):
    save_camera_photo(photo(30, 20), tmp_path / "a.jpg")
    source = read_image_file(tmp_path / "a.jpg")
    no_gps = Image.open(io.BytesIO(encode_image(source, name, source=source, keep="no-gps")))
    assert not no_gps.getexif().get_ifd(ExifTags.IFD.GPSInfo) and b"GPS" not in xmp_of(no_gps)
    assert no_gps.getexif()[ExifTags.Base.Make] == MAKE and b"<dc:title>" in xmp_of(no_gps)
    nothing = Image.open(io.BytesIO(encode_image(source, name, source=source, keep="none")))
    tags = nothing.getexif()  # a TIFF's own layout tags stay, of course
    assert ExifTags.Base.Make not in tags and not tags.get_ifd(ExifTags.IFD.Exif) and not tags.get_ifd(0x8825)
    assert not xmp_of(nothing) and caption(nothing) is None


def test_a_profile_of_another_colour_space_than_rgb_is_not_put_on_the_rgb_output():
    source = decode_image(encoded(photo(), "PNG", icc_profile=icc_profile("LAB")))  # as a CMYK or grey one
    out = Image.open(io.BytesIO(encode_image(source, "a.png", source=source)))
    assert "icc_profile" not in out.info


def test_psnr_of_identical_images_is_infinite_and_of_a_known_shift_is_exact():
    a = np.full((4, 4), 100, np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255), abs=1e-9)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_an_animated_image_is_refused_with_its_frame_count_not_cut_to_one_frame(fmt):
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with pytest.raises(InvalidImage, match="animated \\(3 frames\\)"):
        decode_image(buffer.getvalue())


def test_a_float_image_in_0_to_1_is_read_by_its_range_not_as_black():
    grey = np.linspace(0.0, 1.0, 64 * 8, dtype=np.float32).reshape(8, 64)
    decoded = np.asarray(decode_image(encoded(Image.fromarray(grey), "TIFF")))
    assert decoded[..., 0].max() == 255 and abs(int(decoded[4, 32, 0]) - round(grey[4, 32] * 255)) <= 1


def tinted(image: Image.Image) -> Image.Image:
    """What a model gives back for a grey photo: RGB whose channels drift apart by up to 17 levels."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16) + np.array([9, -8, 3], dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("mode", "name", "expected"),
    [
        ("L", "o.png", "L"),
        ("L", "o.jpg", "L"),
        ("L", "o.tiff", "L"),
        ("LA", "o.png", "LA"),
        ("LA", "o.jpg", "L"),
        ("I;16", "o.png", "I;16"),
        ("I;16", "o.tiff", "I;16"),
        ("I;16", "o.jpg", "L"),  # JPEG has no 16-bit grey
        ("I", "o.tiff", "I;16"),
        ("P", "o.png", "L"),  # a palette of greys
    ],
)
def test_a_grey_photo_comes_back_grey_in_its_own_mode_as_the_luminance_of_the_edit(mode, name, expected):
    grey = photo(40, 30).convert("L")
    if mode in ("I;16", "I"):
        wide = np.asarray(grey, dtype=np.uint16) * 257
        data = encoded(Image.fromarray(wide.astype(np.uint16 if mode == "I;16" else np.int32)), "TIFF")
    elif mode == "LA":
        data = encoded(Image.merge("LA", (grey, Image.linear_gradient("L").resize((40, 30)))))
    else:
        data = encoded(grey.convert(mode) if mode != "P" else grey.quantize(64))
    source = decode_image(data)
    edited = tinted(source)
    out = Image.open(io.BytesIO(encode_image(edited, name, source=source)))
    assert out.mode == expected
    luma = np.asarray(edited, dtype=np.float64) @ [0.299, 0.587, 0.114]
    values = np.asarray(out.getchannel(0) if expected == "LA" else out, dtype=np.float64)
    values = values / 257 if expected == "I;16" else values
    assert np.abs(values - luma).max() <= (8 if name == "o.jpg" else 0.51)


def test_a_grey_photo_comes_back_as_equal_channels_in_webp_which_has_no_grey():
    source = decode_image(encoded(photo(40, 30).convert("L")))
    out = np.asarray(Image.open(io.BytesIO(encode_image(tinted(source), "o.webp", source=source))).convert("RGB"))
    assert np.abs(out.astype(int) - out[..., :1]).max() <= 1


def test_a_cmyk_jpeg_is_converted_through_its_own_profile_to_srgb():
    inks = np.zeros((8, 32, 4), dtype=np.uint8)
    for i in range(3):  # pure cyan, magenta, yellow: 8 columns each, then paper
        inks[:, 8 * i : 8 * (i + 1), i] = 255
    cmyk = Image.fromarray(inks, "CMYK")
    out = decode_image(encoded(cmyk, "JPEG", icc_profile=cmyk_profile(), quality=100))
    seen = np.asarray(out, dtype=np.int16)[4, 4:32:8]
    assert np.abs(seen - np.array([*INKS.values(), (255, 255, 255)])).max() <= 20, seen
    assert np.abs(seen[0] - np.asarray(cmyk.convert("RGB"))[4, 4]).max() > 60  # the naive cyan is (0, 255, 255)
    written = Image.open(io.BytesIO(encode_image(out, "o.jpg", source=out)))
    assert written.mode == "RGB" and written.info["icc_profile"][16:20] == b"RGB "
    without = decode_image(encoded(cmyk, "JPEG", quality=100))  # no profile: the plain conversion, as before
    assert np.abs(np.asarray(without, dtype=np.int16)[4, 4] - [0, 255, 255]).max() <= 3


def test_xmp_too_long_for_a_jpeg_segment_is_left_out_and_the_rest_is_kept(tmp_path, caplog):
    save_camera_photo(photo(30, 20), tmp_path / "a.png")
    source = read_image_file(tmp_path / "a.png")
    source.info[METADATA] = replace(source.info[METADATA], xmp=b"<x>" + b" " * 70_000 + b"</x>")
    out = Image.open(io.BytesIO(encode_image(source, "o.jpg", source=source)))
    assert out.getexif()[ExifTags.Base.Make] == MAKE and "xmp" not in out.info
    assert "the source's xmp (70007 bytes) does not fit a JPEG segment; left out" in caplog.text
