"""Image handling around the model: decoding uploads, resizing, tensors in and out, latent layout.

Owns: turning untrusted image bytes into a checked, upright PIL picture (``load_image`` applies
the EXIF Orientation tag, as viewers do, so a phone's portrait photo is portrait), flattening alpha
(``to_rgb``), the two resizes (VAE: long edge ≤ 1024, short edge ≥ 512, sides a multiple of 16;
ViT: 980 / 224 / 14, both capped by a pixel budget; the sizes are ``sizes.py``'s), pixel ↔ tensor
conversion in [-1, 1], ViT patch extraction with its 2-D position ids, and the packed ↔ grid
layout of VAE latents.
Leaves the networks to ``vit.py`` / ``vae.py`` and the sequence layout to the engine.

Facts taken from the reference (ByteDance-Seed/Bagel ``data/transforms.py``,
``data/data_utils.py``, ``inferencer.py``), re-implemented here:

- The picture is resized with PIL bicubic (PIL always antialiases when shrinking) to the size
  ``sizes.py`` computes.
- Every picture is first resized by the VAE rule; the ViT rule is applied to that result.
- Normalisation is ``(x/255 − 0.5)/0.5``; decoding back to uint8 truncates instead of rounding.
- A ViT patch is flattened in (row-in-patch, column-in-patch, channel) order, the order of the
  checkpoint's linear patch embedding; patch (i, j) gets position id ``i·max_per_side + j``.
- A packed latent row is one 2×2 latent patch in raster order, its columns ordered
  (patch row, patch column, channel).

Departures from the reference: ``tensor_to_image`` converts to float32 on the CPU before the
uint8 conversion (the reference stays in the model dtype); identical for float32 inputs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from bagel.config import BagelConstants
from bagel.errors import InputError
from bagel.sizes import resized_size, vae_size

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_FORMAT_NAMES = "PNG, JPEG or WebP"


def load_image(data: bytes, *, field: str = "image", max_pixels: int = 40_000_000) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes fully and return an upright RGB or RGBA picture.

    Upright: the EXIF Orientation tag (a phone stores a portrait photo sideways and sets tag 6)
    is applied to the pixels and removed, so the engine sees what a viewer shows. The pixel count
    is checked from the header before any pixel is decoded, so a small file that
    claims a huge canvas (a decompression bomb) costs nothing. Raises ``InputError`` naming
    ``field`` for anything that is not a complete picture in an accepted format.
    """
    if not data:
        raise InputError(f"{field}: empty file, expected a {_FORMAT_NAMES} image")
    try:
        # Pillow's own bomb guard warns above ~89 Mpx and raises above ~179 Mpx; our limit is
        # checked right below, so its warning is redundant here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(f"{field}: image exceeds the {max_pixels} pixel limit ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{field}: not a {_FORMAT_NAMES} image") from exc

    if img.format not in ACCEPTED_FORMATS:
        raise InputError(f"{field}: {img.format} images are not accepted, expected {_FORMAT_NAMES}")
    width, height = img.size
    if width < 1 or height < 1:
        raise InputError(f"{field}: {width}x{height} px is an empty image")
    if width * height > max_pixels:
        raise InputError(f"{field}: {width}x{height} px ({width * height} pixels) exceeds the "
                         f"{max_pixels} pixel limit")
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{field}: truncated or corrupt {img.format} image ({exc})") from exc

    # Same branch as the reference's pil_img2rgb: alpha (or a transparent palette entry) is kept
    # as RGBA for ``to_rgb`` to composite; every other mode (LA included, whose alpha the
    # reference drops) becomes plain RGB.
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        return img.convert("RGBA")
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGBA or transparent pictures composited on white; every other mode converted to RGB."""
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _resize(img: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    return img.resize(size_wh, Image.Resampling.BICUBIC)


def resize_for_vae(img: Image.Image, constants: BagelConstants) -> Image.Image:
    """Resize an RGB picture for the VAE (and as the first step of the ViT path)."""
    return _resize(img, vae_size(*img.size, constants))


def resize_for_vit(img: Image.Image, constants: BagelConstants) -> Image.Image:
    """Resize an (already VAE-resized) RGB picture for the SigLIP encoder."""
    size = resized_size(*img.size, max_px=constants.vit_max_px, min_px=constants.vit_min_px,
                        stride=constants.vit_stride, max_pixels=constants.max_pixels)
    return _resize(img, size)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB picture → float32 [3, H, W] in [-1, 1], rounding exactly like the reference."""
    if img.mode != "RGB":
        raise InputError(f"image: mode {img.mode} given, expected RGB (call to_rgb first)")
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    x = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub_(0.5).div_(0.5)


def patchify_vit(pixels: torch.Tensor, patch: int,
                 max_per_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, H, W] → (patches [N, 3·p·p], position ids [N] int64), patches in raster order."""
    channels, height, width = pixels.shape
    if height % patch or width % patch:
        raise InputError(f"image: {width}x{height} px is not a multiple of the {patch} px patch")
    rows, cols = height // patch, width // patch
    if rows > max_per_side or cols > max_per_side:
        raise InputError(f"image: {cols}x{rows} patches exceed the {max_per_side} patches per "
                         f"side limit")
    grid = pixels.reshape(channels, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)
    patches = grid.reshape(rows * cols, patch * patch * channels)
    position_ids = grid_position_ids(rows, cols, max_per_side)
    return patches, position_ids


def grid_position_ids(rows: int, cols: int, max_per_side: int) -> torch.Tensor:
    """Flattened ids ``i·max_per_side + j`` of a rows×cols grid placed at the table's top-left."""
    i = torch.arange(rows, dtype=torch.int64)
    j = torch.arange(cols, dtype=torch.int64)
    return (i[:, None] * max_per_side + j[None, :]).reshape(-1)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Decoder output [3, H, W] in about [-1, 1] → RGB picture, truncating to uint8."""
    scaled = (x.detach().to("cpu", torch.float32) * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
    return Image.fromarray(scaled.to(torch.uint8).numpy())


def unpack_latent(packed: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Packed latent [h·w, p·p·C] → latent picture [1, C, h·p, w·p]."""
    grid = packed.reshape(1, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return grid.reshape(1, c, h * p, w * p)


def pack_latent(latent: torch.Tensor, p: int) -> torch.Tensor:
    """Latent picture [1, C, H, W] (H, W multiples of p) → packed latent [(H/p)·(W/p), p·p·C]."""
    _, c, height, width = latent.shape
    h, w = height // p, width // p
    grid = latent[0, :, : h * p, : w * p].reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0)
    return grid.reshape(h * w, p * p * c)
