"""Test photos as cameras and archives write them: full metadata (EXIF with GPS and a thumbnail, XMP, IPTC), grey
scans, CMYK prints with their own ICC profile. Written with Pillow's own means, not itsd's."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms, IptcImagePlugin
from PIL.PngImagePlugin import PngInfo

TAKEN = "2003:07:14 16:02:31"  # DateTimeOriginal
MAKE, MODEL, LENS = "Olympus", "C-5050Z", "7.1-21.3mm f/1.8"
CAPTION = b"Grandma's garden"  # IPTC 2:120
XMP = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
    b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/" '
    b'xmlns:dc="http://purl.org/dc/elements/1.1/" tiff:Orientation="6" exif:GPSLatitude="48,51.5N" '
    b'exif:GPSLongitude="2,21.0E"><dc:title><rdf:Alt><rdf:li xml:lang="x-default">Garden</rdf:li></rdf:Alt>'
    b'</dc:title></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)


def camera_exif() -> bytes:
    """EXIF as a camera writes it: make, model, capture date, lens, GPS, orientation 6 (rotate to display) and a
    JPEG thumbnail in IFD1."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model], exif[ExifTags.Base.Orientation] = MAKE, MODEL, 6
    exif[ExifTags.IFD.Exif] = {ExifTags.Base.DateTimeOriginal: TAKEN, ExifTags.Base.LensModel: LENS}
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (48.0, 51.0, 30.0)}
    data = bytearray(exif.tobytes())
    tiff = 6  # after b"Exif\0\0"
    order = ">" if data[tiff : tiff + 2] == b"MM" else "<"
    ifd0 = struct.unpack_from(order + "I", data, tiff + 4)[0]
    entries = struct.unpack_from(order + "H", data, tiff + ifd0)[0]
    thumb = io.BytesIO()
    Image.new("RGB", (16, 12), "red").save(thumb, "JPEG")
    ifd1 = len(data) - tiff + (len(data) - tiff) % 2
    data += b"\0" * ((len(data) - tiff) % 2)
    struct.pack_into(order + "I", data, tiff + ifd0 + 2 + 12 * entries, ifd1)  # IFD0's next IFD: IFD1
    thumb_at = ifd1 + 2 + 3 * 12 + 4
    data += struct.pack(order + "H", 3)
    data += struct.pack(order + "HHIHH", 0x0103, 3, 1, 6, 0)  # Compression: JPEG
    data += struct.pack(order + "HHII", 0x0201, 4, 1, thumb_at)
    data += struct.pack(order + "HHII", 0x0202, 4, 1, len(thumb.getvalue()))
    data += struct.pack(order + "I", 0) + thumb.getvalue()
    return bytes(data)


def iptc() -> bytes:
    return b"\x1c\x02\x78" + struct.pack(">H", len(CAPTION)) + CAPTION


def save_camera_photo(image: Image.Image, path: Path) -> None:
    """`image` saved at `path` in the format its suffix names, with the camera's EXIF, XMP and (JPEG, TIFF) IPTC."""
    fmt = Image.registered_extensions()[path.suffix.lower()]
    if fmt == "TIFF":
        exif = Image.Exif()
        exif.load(camera_exif())
        exif[ExifTags.IFD.Exif], exif[ExifTags.IFD.GPSInfo] = exif.get_ifd(0x8769), exif.get_ifd(0x8825)
        exif[700], exif[33723] = XMP, iptc()
        image.save(path, exif=exif)
    elif fmt == "PNG":
        info = PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP.decode())
        image.save(path, exif=camera_exif(), pnginfo=info)
    elif fmt == "JPEG":
        resource = b"8BIM\x04\x04\0\0" + struct.pack(">I", len(iptc())) + iptc() + b"\0" * (len(iptc()) % 2)
        segment = b"Photoshop 3.0\0" + resource
        app13 = b"\xff\xed" + struct.pack(">H", len(segment) + 2) + segment
        image.save(path, exif=camera_exif(), xmp=XMP, extra=app13, quality=95)
    else:
        image.save(path, exif=camera_exif(), xmp=XMP)


def caption(image: Image.Image) -> bytes | None:
    """The IPTC caption Pillow reads from a JPEG or TIFF."""
    found = IptcImagePlugin.getiptcinfo(image) or {}
    return found.get((2, 120))


def cmyk_profile() -> bytes:
    """A CMYK output profile (ICC v2, one lut16 A2B0 of 2 grid points) whose inks are not the naive ones: pure
    cyan, magenta and yellow print as the sRGB colours in INKS, paper is white, black is black, and every mix
    interpolates between those corners in Lab."""
    srgb, lab_space = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
    srgb_to_lab = ImageCms.buildTransform(srgb, lab_space, "RGB", "LAB", ImageCms.Intent.RELATIVE_COLORIMETRIC)
    corners = []
    for c, m, y, k in np.ndindex(2, 2, 2, 2):  # first channel slowest, as the CLUT is ordered
        rgb = np.full(3, 255.0) if not k else np.zeros(3)
        for ink, on in zip(INKS.values(), (c, m, y), strict=True):
            rgb = rgb * (np.asarray(ink) / 255.0) if on else rgb
        corners.append(tuple(round(v) for v in rgb))
    swatch = Image.new("RGB", (len(corners), 1))
    swatch.putdata(corners)
    lab = np.asarray(ImageCms.applyTransform(swatch, srgb_to_lab), dtype=np.int16)[0]  # L 0..255; a, b signed bytes
    lab[:, 1:] = (lab[:, 1:] + 128) % 256  # offset by 128, as the profile's 16-bit Lab wants it (times 256)
    clut = b"".join(struct.pack(">3H", round(L / 255 * 0xFF00), a * 256, b * 256) for L, a, b in lab.tolist())
    lut = (
        b"mft2\0\0\0\0"
        + bytes([4, 3, 2, 0])  # 4 inputs, 3 outputs, 2 grid points
        + struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)  # identity matrix
        + struct.pack(">HH", 2, 2)
        + struct.pack(">2H", 0, 65535) * 4
        + clut
        + struct.pack(">2H", 0, 65535) * 3
    )
    d50 = b"XYZ \0\0\0\0" + struct.pack(">3i", 63190, 65536, 54061)
    text = b"CMYK test inks"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text) + 1) + text + b"\0" + b"\0" * (4 + 4 + 2 + 1 + 67)
    cprt = b"text\0\0\0\0" + b"no copyright\0"
    tags = [(b"desc", desc), (b"wtpt", d50), (b"cprt", cprt), (b"A2B0", lut)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + b"prtrCMYKLab "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + struct.pack(">I", 1)
        + struct.pack(">3i", 63190, 65536, 54061)
        + b"\0" * 48
    )
    return header + struct.pack(">I", len(tags)) + table + body


INKS = {"cyan": (0, 160, 227), "magenta": (230, 0, 126), "yellow": (255, 237, 0)}  # sRGB colours of the test inks


CAMERA_FORMATS = ("a.jpg", "b.png", "c.webp", "d.tiff")


def photo_collection(folder: Path, photo: Image.Image) -> Path:
    """An archive in `folder`: `photo` from a camera in each output format (CAMERA_FORMATS, full metadata), a grey
    scan (grey.png, 8-bit) and a 16-bit one (scan16.png), and a CMYK print (print.jpg) with its profile."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CAMERA_FORMATS:
        save_camera_photo(photo, folder / name)
    grey = photo.convert("L")
    grey.save(folder / "grey.png")
    Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(folder / "scan16.png")
    photo.convert("CMYK").save(folder / "print.jpg", icc_profile=cmyk_profile(), quality=95)
    return folder


def check_collection(out: Path, size: tuple[int, int], gps: bool = True) -> None:
    """The edited archive in `out` kept what `photo_collection` put in: every camera photo its capture date, camera,
    lens, XMP and (JPEG, TIFF) IPTC, upright at `size` (its width and height swapped by orientation 6), its
    location only with `gps`; the scans grey in their own bit depth; the print sRGB."""
    for name in CAMERA_FORMATS:
        with Image.open(out / name) as image:
            exif = image.getexif()
            taken = exif.get_ifd(ExifTags.IFD.Exif)
            assert image.size == size[::-1] and exif[ExifTags.Base.Orientation] == 1, name
            assert (exif[ExifTags.Base.Make], exif[ExifTags.Base.Model]) == (MAKE, MODEL), name
            assert (taken[ExifTags.Base.DateTimeOriginal], taken[ExifTags.Base.LensModel]) == (TAKEN, LENS), name
            assert bool(exif.get_ifd(ExifTags.IFD.GPSInfo)) == gps, name
            assert b"<dc:title>" in image.info["xmp"] and (b"GPSLatitude" in image.info["xmp"]) == gps, name
            if name in ("a.jpg", "d.tiff"):
                assert caption(image) == CAPTION, name
    with (
        Image.open(out / "grey.png") as grey,
        Image.open(out / "scan16.png") as scan,
        Image.open(out / "print.jpg") as cmyk,
    ):
        assert (grey.mode, scan.mode, cmyk.mode) == ("L", "I;16", "RGB")
        assert cmyk.info["icc_profile"][16:20] == b"RGB "
