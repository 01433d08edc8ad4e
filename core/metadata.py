"""What an output keeps of its photo's metadata: EXIF (capture date, camera, lens, exposure, GPS), XMP and IPTC.

They are read from the source file when it is decoded (`read_metadata`, before its orientation is applied) and
written into the output by its format's own means (`save_options`): EXIF into JPEG, PNG, WebP and TIFF; XMP into
the same four; IPTC into JPEG (Photoshop APP13) and TIFF. The pixels are upright by then, so the EXIF and XMP
orientation become 1; EXIF's thumbnail (IFD1) and the source file's own layout tags (strips, bits per sample,
...) are not copied, and the EXIF pixel dimensions become the output's. What to keep is one of
`core.params.KEEP`: everything, everything but location (the GPS IFD and XMP's exif:GPS properties), or nothing
(`--strip-gps`, `--strip-metadata`). The ICC profile is not metadata here: it says what the pixel values mean
(core.images).
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

METADATA = "itsd_metadata"  # the info key under which a decoded image keeps its source's Metadata

_ORIENTATION, _XMP_TAG, _IPTC_TAG = 0x0112, 700, 33723
_PIXEL_SIZE = (0xA002, 0xA003)  # Exif IFD: PixelXDimension, PixelYDimension
# IFD0 tags that describe how the source file stored its pixels, not the photo: never copied.
_LAYOUT = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 317, 320, 322, 323, 324, 325}
    | {330, 338, 339, 347, 513, 514, 529, 530, 531, 532, 34675, _XMP_TAG, _IPTC_TAG, 34377, _ORIENTATION}
    | {ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo}
)
_IPTC_RESOURCE = 0x0404  # Photoshop image resource that holds IPTC-IIM
_JPEG_SEGMENT = 65533  # bytes a JPEG marker segment holds after its length
_XMP_ORIENTATION = {  # XMP's copy of the orientation, and what it becomes
    rb'tiff:Orientation="\d"': b'tiff:Orientation="1"',
    rb"<tiff:Orientation>\d</tiff:Orientation>": b"<tiff:Orientation>1</tiff:Orientation>",
}
_XMP_GPS = (rb'\s+exif:GPS\w+="[^"]*"', rb"<exif:GPS(\w+)>.*?</exif:GPS\1>\s*")


@dataclass(frozen=True)
class Metadata:
    """A source's metadata, read into plain values (nothing refers back to the source file)."""

    exif: dict[int, Any] = field(default_factory=dict)  # IFD0 tags, layout tags and orientation left out
    exif_ifd: dict[int, Any] = field(default_factory=dict)  # capture date, exposure, lens; Interop as a dict
    gps: dict[int, Any] = field(default_factory=dict)
    xmp: bytes = b""
    iptc: bytes = b""  # IPTC-IIM records, as in a Photoshop 0x0404 resource or TIFF tag 33723


def read_metadata(image: Image.Image) -> Metadata:
    """The metadata of a just-opened image (JPEG, PNG, WebP, TIFF; others have none that Pillow reads)."""
    exif = image.getexif()
    exif_ifd = dict(exif.get_ifd(ExifTags.IFD.Exif))
    if isinstance(exif_ifd.get(ExifTags.IFD.Interop), int):
        exif_ifd[ExifTags.IFD.Interop] = dict(exif.get_ifd(ExifTags.IFD.Interop))
    xmp = image.info.get("xmp") or b""
    tags = getattr(image, "tag_v2", {})
    if not xmp and _XMP_TAG in tags:
        xmp = tags[_XMP_TAG]
    iptc = image.info.get("photoshop", {}).get(_IPTC_RESOURCE) or tags.get(_IPTC_TAG) or b""
    return Metadata(
        exif={tag: value for tag, value in exif.items() if tag not in _LAYOUT},
        exif_ifd=exif_ifd,
        gps=dict(exif.get_ifd(ExifTags.IFD.GPSInfo)),
        xmp=_upright(xmp.encode() if isinstance(xmp, str) else bytes(xmp)),
        iptc=iptc if isinstance(iptc, bytes) else b"",  # a TIFF tag typed LONG, Pillow reads as one number: lost
    )


def save_options(metadata: Metadata | None, fmt: str, size: tuple[int, int], keep: str) -> dict[str, Any]:
    """Pillow save options that put `metadata` (what `keep`, of core.params.KEEP, keeps of it) into an image of
    `size` in `fmt`."""
    if metadata is None or keep == "none" or fmt not in ("JPEG", "PNG", "WEBP", "TIFF"):
        return {}
    exif = _exif(metadata, size, keep)
    xmp = metadata.xmp if keep == "all" else _without_gps(metadata.xmp)
    if fmt == "TIFF":  # one IFD holds it all
        if xmp:
            exif[_XMP_TAG] = xmp
        if metadata.iptc:
            exif[_IPTC_TAG] = metadata.iptc
    options: dict[str, Any] = {"exif": exif.tobytes()} if len(exif) else {}
    if fmt == "TIFF":
        return options
    if fmt == "PNG" and xmp:
        info = PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"), zip=True)
        options["pnginfo"] = info
    elif xmp:
        options["xmp"] = xmp
    return _fitting_jpeg(options, metadata.iptc) if fmt == "JPEG" else options


def _exif(metadata: Metadata, size: tuple[int, int], keep: str) -> Image.Exif:
    exif = Image.Exif()
    if not (metadata.exif or metadata.exif_ifd or metadata.gps):
        return exif
    exif.update(metadata.exif)
    exif[_ORIENTATION] = 1  # the pixels are upright
    if metadata.exif_ifd:
        sub = dict(metadata.exif_ifd)
        for tag, value in zip(_PIXEL_SIZE, size, strict=True):
            if tag in sub:
                sub[tag] = value
        exif[ExifTags.IFD.Exif] = sub
    if metadata.gps and keep == "all":
        exif[ExifTags.IFD.GPSInfo] = metadata.gps
    return exif


def _upright(xmp: bytes) -> bytes:
    for pattern, upright in _XMP_ORIENTATION.items():
        xmp = re.sub(pattern, upright, xmp)
    return xmp


def _without_gps(xmp: bytes) -> bytes:
    for pattern in _XMP_GPS:
        xmp = re.sub(pattern, b"", xmp, flags=re.DOTALL)
    return xmp


def _fitting_jpeg(options: dict[str, Any], iptc: bytes) -> dict[str, Any]:
    """The EXIF, XMP and IPTC that fit a JPEG marker segment each (one that does not is left out, with a
    warning, rather than failing the image); IPTC goes in a Photoshop APP13 segment."""
    fitting: dict[str, Any] = {}
    for name, overhead in (("exif", 0), ("xmp", 29)):
        if name in options:
            if len(options[name]) + overhead <= _JPEG_SEGMENT:
                fitting[name] = options[name]
            else:
                size = len(options[name])
                log.warning("the source's %s (%d bytes) does not fit a JPEG segment; left out", name, size)
    if iptc:
        resource = b"8BIM" + struct.pack(">H", _IPTC_RESOURCE) + b"\0\0" + struct.pack(">I", len(iptc)) + iptc
        segment = b"Photoshop 3.0\0" + resource + b"\0" * (len(iptc) % 2)
        if len(segment) <= _JPEG_SEGMENT:
            fitting["extra"] = b"\xff\xed" + struct.pack(">H", len(segment) + 2) + segment
    return fitting
