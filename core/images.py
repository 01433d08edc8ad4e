"""Image rules every part follows: decoding, orientation, colour modes, size limits, working size.

Pixels enter the model as float32 NCHW in [-1, 1] at the *working size*: the input's own, or, when a
`max_side` is asked for, shrunk with its aspect kept so its longest side is at most that. The working image
is padded by mirroring its edges up to the latent grid (multiples of 64 px), and the model's output is
cropped back and, only when it was shrunk, resized to the input's size.

What the model does not see goes back into the output: the source's ICC profile (a Display P3 phone photo stays
P3), where the output format has one its alpha channel, its metadata (core.metadata: EXIF, XMP, IPTC, with the
orientation made 1, since the pixels are upright), and its greyness: the model sees 8-bit RGB, and a grey source
(modes 1, L, LA, I, I;16, F, or a palette of greys) comes back as the luminance of the result, 8-bit, or 16-bit
where the source held 16-bit values and the format has them (PNG, TIFF). A CMYK source with a CMYK ICC profile is
converted through it to sRGB (relative colorimetric, black point compensation), and its output is sRGB RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from core.errors import ImageTooLarge, InputNotFound, InvalidImage
from core.metadata import METADATA, read_metadata, save_options
from core.storage import DEFAULT_MAX_INPUT_BYTES, check_readable

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: any camera photo; stops decompression bombs before decoding
ALPHA = "itsd_alpha"  # the info key under which an RGB image from to_rgb keeps its source's alpha ("L")
GREY = "itsd_grey"  # the info key under which an RGB image from a grey source keeps that source's bits (8 or 16)
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_WIDE = frozenset({"PNG", "TIFF"})  # output formats that carry 16-bit grey
_WITH_ALPHA = frozenset({"PNG", "WEBP", "TIFF"})  # output formats that can carry it back
# Encoders for output files, by suffix; anything else is written as PNG under its own name.
_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
}


def read_image_file(
    path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_INPUT_BYTES
) -> Image.Image:
    """Decode a local file; a device, FIFO or file over `max_bytes` is refused before it is read."""
    try:
        check_readable(path, max_bytes)
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputNotFound("no such file") from None
    except IsADirectoryError:
        raise InputNotFound("a folder, not an image") from None
    except OSError as exc:
        raise InputNotFound(f"cannot read: {exc.strerror or exc}") from None
    return decode_image(data, max_pixels=max_pixels)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes into an upright RGB image, or raise a specific, permanent error (no file name in it)."""
    if not data:
        raise InvalidImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{width}x{height} is {width * height / 1e6:.1f} MP, over the limit of "
                    f"{max_pixels / 1e6:.1f} MP (raise ITSD_MAX_PIXELS to allow it)"
                )
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise InvalidImage(f"animated ({frames} frames); itsd edits still images: extract a frame first")
            image.load()
            metadata = read_metadata(image)  # before the orientation is applied: TIFF tags do not survive it
            image = ImageOps.exif_transpose(image)  # malformed EXIF fails here, as an invalid image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise InvalidImage(f"cannot decode: {reason}") from None
    rgb = to_rgb(image)
    rgb.info[METADATA] = metadata
    return rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha over white, palettes expanded, 16-bit and float rescaled, CMYK through its
    profile. The result's info keeps what encode_image puts back: the ICC profile that describes it (the source's,
    sRGB for a CMYK one converted), the alpha channel (if any) under ALPHA, and a grey source's bits under GREY."""
    icc = image.info.get("icc_profile") or b""
    if image.mode == "CMYK" and _space(icc) == b"CMYK":
        rgb, icc = _cmyk_to_srgb(image, icc)
    else:
        rgb = _rgb(image)
    grey = _grey_bits(image)
    if _space(icc) == b"RGB " or (grey and _space(icc) == b"GRAY"):  # else it does not describe what is written
        rgb.info["icc_profile"] = icc
    else:
        rgb.info.pop("icc_profile", None)
    if grey:
        rgb.info[GREY] = grey
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgb.info[ALPHA] = (image if image.mode == "RGBA" else image.convert("RGBA")).getchannel("A")
    return rgb


def _space(icc: bytes) -> bytes:
    return icc[16:20]  # an ICC profile's data colour space: b"RGB ", b"GRAY", b"CMYK", ...


def _grey_bits(image: Image.Image) -> int:
    """8 or 16 for a grey image (16: it holds values over 255), 0 for any other."""
    if image.mode == "P":
        palette = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        used = palette[[index for _, index in image.getcolors(256) or [] if index < len(palette)]]
        return 8 if used.size and (used == used[:, :1]).all() else 0
    if image.mode not in _GREY_MODES:
        return 0
    return 16 if image.mode[0] in "IF" and np.asarray(image).max(initial=0) > 255 else 8


def _cmyk_to_srgb(image: Image.Image, icc: bytes) -> tuple[Image.Image, bytes]:
    """CMYK through its own profile to sRGB (and sRGB's profile); a profile lcms cannot use is ignored."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    try:
        rgb = ImageCms.profileToProfile(
            image,
            ImageCms.ImageCmsProfile(io.BytesIO(icc)),
            srgb,
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB",
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image.convert("RGB"), b""
    return rgb, srgb.tobytes()


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0)
        # by their range: floats in [0, 1] (as HDR and scientific tools write them), else 8 or 16 bits
        peak = 1.0 if image.mode == "F" and top <= 1.0 else 255.0 if top <= 255 else 65535.0
        grey = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def working_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The size the model sees: the input's own, or shrunk (aspect kept) so its longest side is <= max_side."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def pad_to_multiple(image: Image.Image, size: tuple[int, int], multiple: int) -> np.ndarray:
    """RGB image at `size` (width, height), its right and bottom mirrored out to multiples of `multiple`:
    uint8 [H, W, 3]. Mirroring, not a flat colour, so the model sees no edge that is not in the photo."""
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    pixels = np.asarray(image)
    width, height = size
    pad_y, pad_x = -height % multiple, -width % multiple
    if pad_y or pad_x:
        pixels = np.pad(pixels, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")
    return pixels


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1]."""
    unit = pixels.astype(np.float32) / 255.0
    return np.ascontiguousarray((unit * 2.0 - 1.0).transpose(2, 0, 1)[None])


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output, float [3, H, W] in [-1, 1] -> uint8 [H, W, 3], rounding as diffusers does."""
    unit = np.clip(decoded.astype(np.float32) / 2.0 + 0.5, 0.0, 1.0)
    return (unit.transpose(1, 2, 0) * 255.0).round().astype(np.uint8)


def restore_size(pixels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(pixels)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def encode_image(image: Image.Image, name: str, source: Image.Image | None = None, keep: str = "all") -> bytes:
    """Encode for a file called `name`, in the format its suffix names (PNG when unknown). With the decoded
    `source` it was edited from: its ICC profile, its alpha channel where the format has one, its greyness, and
    what `keep` (of core.params.KEEP) keeps of its metadata."""
    fmt = _FORMATS.get(Path(name).suffix.lower(), "PNG")
    options: dict[str, object] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    info = source.info if source is not None else {}
    if info.get(GREY):
        image = _luminance(image, 16 if info[GREY] == 16 and fmt in _WIDE else 8)
    if ALPHA in info and fmt in _WITH_ALPHA:
        alpha = info[ALPHA]
        image = image.convert("L" if image.mode == "L" else "RGB")
        image.putalpha(alpha if alpha.size == image.size else alpha.resize(image.size, Image.Resampling.LANCZOS))
    if fmt == "WEBP" and image.mode in ("L", "LA"):  # WebP has no grey: equal channels, and no grey profile
        image = image.convert("RGBA" if image.mode == "LA" else "RGB")
    icc = info.get("icc_profile") or b""
    if fmt != "GIF" and _space(icc) == (b"RGB " if image.mode in ("RGB", "RGBA") else b"GRAY"):
        options["icc_profile"] = icc
    options.update(save_options(info.get(METADATA), fmt, image.size, keep))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _luminance(image: Image.Image, bits: int) -> Image.Image:
    """The edited RGB as grey: its luminance (ITU-R 601), 8-bit ("L") or 16-bit ("I;16", from the unrounded
    luminance, so the extra bits carry its fractions)."""
    if bits == 8:
        return image.convert("L")
    luma = np.asarray(image.convert("RGB"), dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    return Image.fromarray(np.round(luma * (65535 / 255)).astype(np.uint16))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical arrays)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)
