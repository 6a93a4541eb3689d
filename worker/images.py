"""Validation of uploaded input images, with Pillow only (no model code).

Owns: deciding whether uploaded bytes are an acceptable image — PNG, JPEG or WebP by their
magic bytes, within the byte limit, with a header that declares no more pixels and no longer
side than allowed (checked BEFORE any pixel is decoded, so decompression bombs cost nothing),
and fully decodable (truncated or corrupt files are refused). The size reported and checked is
the upright one: EXIF Orientation 5–8 (a phone's portrait photo stored sideways) swaps width and
height, as ``bagel.transforms.load_image`` rotates the pixels. Leaves storing the bytes to
``worker.storage`` and resizing for the model to ``bagel.transforms``.

Pillow's own decompression-bomb guard (a warning, then an error, at 89 M / 179 M pixels) is
turned into our ``ImageTooLarge`` too, without changing Pillow's global limit.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from worker.errors import ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedImageFormat

CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}

# EXIF tag 0x0112 (Orientation); values 5-8 transpose the picture, so width and height swap.
_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

# Formats we recognise only to name them in the error message.
_OTHER_SIGNATURES = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                     (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"))


@dataclass(frozen=True)
class ImageInfo:
    """What an accepted upload is: format, size and content hash."""

    format: str  # "PNG" | "JPEG" | "WEBP"
    content_type: str
    width: int
    height: int
    size_bytes: int
    sha256: str

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def sniff_format(data: bytes) -> str | None:
    """"PNG", "JPEG" or "WEBP" from the magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int, max_side_px: int,
                  field: str = "file") -> ImageInfo:
    """Accept or refuse an upload. Raises ``PayloadTooLarge``, ``UnsupportedImageFormat``,
    ``ImageTooLarge`` or ``InvalidImage`` with a message naming ``field``, the value and the limit."""
    size = len(data)
    if size == 0:
        raise InvalidImage(f"{field}: the upload is empty (0 bytes)", field=field)
    if size > max_bytes:
        raise PayloadTooLarge(f"{field}: {size:,} bytes exceeds the {max_bytes:,} byte limit", field=field)
    fmt = sniff_format(data)
    if fmt is None:
        other = next((name for magic, name in _OTHER_SIGNATURES if data.startswith(magic)), None)
        if other:
            raise UnsupportedImageFormat(
                f"{field}: {other} images are not accepted (use PNG, JPEG or WebP)", field=field)
        raise InvalidImage(f"{field}: not a PNG, JPEG or WebP image (unrecognised leading bytes)", field=field)

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[fmt])  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"{field}: declares more than the {max_pixels:,} pixel limit ({exc})",
                                field=field) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidImage(f"{field}: corrupt {fmt} header ({exc})", field=field) from exc
        with image:
            # JPEG and WebP parse EXIF with the header. A PNG's eXIf chunk may follow the pixel
            # data, and PngImageFile.getexif decodes the pixels to reach it, so a PNG without an
            # eXIf chunk before its data is read again after the limit checks and the decode.
            is_exif_in_header = fmt != "PNG" or "exif" in image.info
            orientation = _orientation(image, field, fmt) if is_exif_in_header else None
            width, height = _upright_size(image.size, orientation)
            if max(width, height) > max_side_px:
                raise ImageTooLarge(f"{field}: {width}x{height} px exceeds the {max_side_px} px per side limit",
                                    field=field)
            if width * height > max_pixels:
                raise ImageTooLarge(f"{field}: {width}x{height} px = {width * height:,} pixels exceeds the "
                                    f"{max_pixels:,} pixel limit", field=field)
            if width < 1 or height < 1:
                raise InvalidImage(f"{field}: {width}x{height} px has no pixels", field=field)
            try:
                image.load()  # full decode: truncated or corrupt data fails here
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageTooLarge(f"{field}: {exc}", field=field) from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise InvalidImage(f"{field}: truncated or corrupt {fmt} image ({exc})", field=field) from exc
            if not is_exif_in_header:
                width, height = _upright_size(image.size, _orientation(image, field, fmt))
    return ImageInfo(format=fmt, content_type=CONTENT_TYPES[fmt], width=width, height=height,
                     size_bytes=size, sha256=hashlib.sha256(data).hexdigest())


def _orientation(image: Image.Image, field: str, fmt: str) -> int | None:
    """The EXIF Orientation value (1-8 when set), or None without one."""
    try:
        return image.getexif().get(_ORIENTATION_TAG)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"{field}: corrupt EXIF block in the {fmt} image ({exc})", field=field) from exc


def _upright_size(size: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """(width, height) as displayed: swapped for orientations 5-8."""
    width, height = size
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)
