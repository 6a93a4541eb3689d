"""Upload validation (worker.images): formats, byte and pixel limits checked from the header
before decoding, garbage and truncated files."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from PIL import Image

from worker.errors import ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedImageFormat
from worker.images import inspect_image

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 4_000_000, "max_side_px": 4096}


def encode(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    image = Image.new("RGB", size, (200, 30, 90))
    for x in range(size[0]):
        image.putpixel((x, x % size[1]), (x % 255, 10, 10))  # some detail so files are not trivial
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width``×``height`` but holds no pixel data: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
            + struct.pack(">I", zlib.crc32(b"IEND")))


@pytest.mark.parametrize(("fmt", "content_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                                   ("WEBP", "image/webp")])
def test_accepts_png_jpeg_webp(fmt, content_type):
    data = encode(fmt)
    info = inspect_image(data, **LIMITS)
    assert (info.format, info.content_type, info.width, info.height) == (fmt, content_type, 40, 30)
    assert info.size_bytes == len(data) and len(info.sha256) == 64


def test_garbage_bytes_are_not_an_image():
    with pytest.raises(InvalidImage, match=r"file: not a PNG, JPEG or WebP image"):
        inspect_image(b"hello, this is not an image at all", **LIMITS)
    with pytest.raises(InvalidImage, match=r"file: the upload is empty \(0 bytes\)"):
        inspect_image(b"", **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(fmt):
    data = encode(fmt, (64, 64))
    with pytest.raises(InvalidImage, match=rf"file: (truncated or corrupt|corrupt) {fmt}"):
        inspect_image(data[: len(data) * 2 // 3], **LIMITS)


def test_png_with_a_bad_magic_payload_is_corrupt():
    with pytest.raises(InvalidImage, match="corrupt PNG"):
        inspect_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, **LIMITS)


def test_other_formats_are_named_and_refused():
    gif = encode("GIF")
    with pytest.raises(UnsupportedImageFormat, match=r"file: GIF images are not accepted \(use PNG, JPEG or WebP\)"):
        inspect_image(gif, **LIMITS)
    with pytest.raises(UnsupportedImageFormat, match="BMP"):
        inspect_image(encode("BMP"), **LIMITS)


def test_byte_limit():
    data = encode("PNG")
    with pytest.raises(PayloadTooLarge, match=rf"file: {len(data):,} bytes exceeds the 100 byte limit"):
        inspect_image(data, max_bytes=100, max_pixels=10**9, max_side_px=10**5)


def test_pixel_and_side_limits_are_checked_from_the_header_before_decoding():
    bomb = png_header_only(3000, 3000)  # 9 M pixels declared, no data: decoding would fail
    with pytest.raises(ImageTooLarge, match=r"file: 3000x3000 px = 9,000,000 pixels exceeds the 4,000,000 pixel limit"):
        inspect_image(bomb, **LIMITS)
    with pytest.raises(ImageTooLarge, match=r"file: 5000x10 px exceeds the 4096 px per side limit"):
        inspect_image(png_header_only(5000, 10), **LIMITS)
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge):
        inspect_image(png_header_only(60000, 60000), **LIMITS)
    assert time.perf_counter() - started < 0.5


def test_pillow_bomb_guard_becomes_image_too_large():
    huge = png_header_only(20000, 20000)  # 400 M pixels: Pillow's own guard trips at open
    with pytest.raises(ImageTooLarge, match="pixel limit"):
        inspect_image(huge, max_bytes=10**6, max_pixels=10**12, max_side_px=10**6)


def test_field_name_is_carried():
    with pytest.raises(InvalidImage) as info:
        inspect_image(b"junk", field="product_file", **LIMITS)
    assert info.value.field == "product_file" and str(info.value).startswith("product_file:")


def oriented_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    """A JPEG stored at ``size`` whose EXIF says to display it with ``orientation`` applied."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", size, (20, 40, 200)).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(("orientation", "upright"), [(1, (384, 192)), (3, (384, 192)), (6, (192, 384)),
                                                      (8, (192, 384))])
def test_reported_size_is_the_upright_size(orientation, upright):
    info = inspect_image(oriented_jpeg((384, 192), orientation), **LIMITS)
    assert (info.width, info.height) == upright


def test_orientation_is_read_from_a_png_exif_chunk():
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (384, 192), (20, 40, 200)).save(buf, format="PNG", exif=exif.tobytes())
    info = inspect_image(buf.getvalue(), **LIMITS)
    assert (info.width, info.height) == (192, 384)


def test_side_limit_names_the_upright_size():
    sideways = oriented_jpeg((4000, 100), 6)
    with pytest.raises(ImageTooLarge, match=r"file: 100x4000 px exceeds the 3000 px per side limit"):
        inspect_image(sideways, max_bytes=1_000_000, max_pixels=4_000_000, max_side_px=3000)
    too_many = r"file: 100x4000 px = 400,000 pixels exceeds the 300,000 pixel limit"
    with pytest.raises(ImageTooLarge, match=too_many):
        inspect_image(sideways, max_bytes=1_000_000, max_pixels=300_000, max_side_px=5000)
