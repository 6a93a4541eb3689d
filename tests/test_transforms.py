"""Image transforms: decoding untrusted bytes, resize rules against the reference's pictures,
tensor conversions, ViT patch order and the packed latent layout."""

import io
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from bagel.config import BagelConstants, GenerationParams
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.loading import load_checkpoint
from bagel.requests import Request
from bagel.transforms import (
    grid_position_ids,
    image_to_tensor,
    load_image,
    pack_latent,
    patchify_vit,
    resize_for_vae,
    resize_for_vit,
    resized_size,
    tensor_to_image,
    to_rgb,
    unpack_latent,
)

CONSTANTS = BagelConstants()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["img_a1", "img_a2"])
def test_resized_pictures_are_bit_identical_to_the_reference(golden_dir, name):
    g = golden_dir / "golden"
    raw = load_image((g / f"{name}.png").read_bytes(), field="images[0]")
    vae = resize_for_vae(to_rgb(raw), CONSTANTS)
    vit = resize_for_vit(vae, CONSTANTS)
    for got, file in ((vae, f"{name}.vae_resized.png"), (vit, f"{name}.vit_resized.png")):
        expected = Image.open(g / file)
        assert got.size == expected.size, file
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
        assert diff.max() == 0, f"{file}: {int((diff > 0).sum())} values differ, max {diff.max()}"


def test_image_to_tensor_is_the_reference_normalisation(golden_dir):
    img = Image.open(golden_dir / "golden" / "img_a1.vit_resized.png")
    x = image_to_tensor(img)
    arr = np.asarray(img).astype(np.float32)
    expected = torch.from_numpy((arr / np.float32(255) - np.float32(0.5)) / np.float32(0.5))
    assert x.dtype == torch.float32 and x.shape == (3, 518, 602)
    assert torch.equal(x, expected.permute(2, 0, 1))


def test_resize_respects_long_edge_stride_and_pixel_budget():
    for w, h in [(4000, 3000), (1, 1), (5000, 300), (513, 511), (1024, 1024)]:
        vw, vh = resized_size(w, h, max_px=1024, min_px=512, stride=16,
                              max_pixels=CONSTANTS.max_pixels)
        assert vw % 16 == 0 and vh % 16 == 0, (w, h, vw, vh)
        assert max(vw, vh) <= 1024 and vw * vh <= CONSTANTS.max_pixels, (w, h, vw, vh)
    assert resized_size(4000, 3000, max_px=1024, min_px=512, stride=16,
                        max_pixels=CONSTANTS.max_pixels) == (1024, 768)
    assert resized_size(100, 90, max_px=1024, min_px=512, stride=16,
                        max_pixels=CONSTANTS.max_pixels) == (576, 512)


def test_load_image_rejects_bytes_that_are_not_an_image():
    with pytest.raises(InputError, match=r"^images\[0\]: not a PNG, JPEG or WebP image$") as err:
        load_image(b"definitely not a picture" * 10, field="images[0]")
    assert err.value.code == "invalid_input"
    with pytest.raises(InputError, match=r"^images\[2\]: empty file"):
        load_image(b"", field="images[2]")


def test_load_image_rejects_other_formats():
    gif = _encoded(Image.new("RGB", (8, 8), (10, 20, 30)), "GIF")
    with pytest.raises(InputError, match=r"^images\[1\]: GIF images are not accepted, expected "
                                         r"PNG, JPEG or WebP$"):
        load_image(gif, field="images[1]")


def test_load_image_rejects_a_truncated_png():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = _png_bytes(noisy)
    with pytest.raises(InputError, match=r"^images\[0\]: truncated or corrupt PNG image"):
        load_image(data[: len(data) // 2], field="images[0]")


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width×height (a decompression bomb's header)."""
    data = bytearray(_png_bytes(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_load_image_checks_the_pixel_count_before_decoding():
    bomb = _png_claiming_size(60_000, 50_000)
    assert len(bomb) < 100
    with pytest.raises(InputError, match=r"^images\[0\]: .*exceeds the 40000000 pixel limit"):
        load_image(bomb, field="images[0]")
    moderate = _png_claiming_size(8000, 6000)
    with pytest.raises(InputError, match=r"^images\[0\]: 8000x6000 px \(48000000 pixels\) "
                                         r"exceeds the 40000000 pixel limit$"):
        load_image(moderate, field="images[0]")
    small = _png_bytes(Image.new("RGB", (30, 20)))
    with pytest.raises(InputError, match=r"^image: 30x20 px \(600 pixels\) exceeds the 500 pixel "
                                         r"limit$"):
        load_image(small, max_pixels=500)


def test_rgba_input_keeps_alpha_and_composites_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 0)  # fully transparent → white
    rgba[0, 1] = (200, 10, 10, 255)  # opaque → unchanged
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black → mid grey
    rgba[1, :] = (10, 200, 30, 255)
    img = load_image(_png_bytes(Image.fromarray(rgba, "RGBA")))
    assert img.mode == "RGBA"
    rgb = np.asarray(to_rgb(img))
    assert to_rgb(img).mode == "RGB"
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (200, 10, 10)
    assert all(126 <= v <= 128 for v in rgb[0, 2]), rgb[0, 2]
    assert tuple(rgb[1, 2]) == (10, 200, 30)


def test_palette_transparency_becomes_rgba_and_grey_becomes_rgb():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=1)
    img = load_image(buf.getvalue())
    assert img.mode == "RGBA"
    assert tuple(np.asarray(to_rgb(img))[0, 0]) == (255, 255, 255)
    grey = load_image(_png_bytes(Image.new("L", (4, 4), 77)))
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[0, 0]) == (77, 77, 77)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_decode_to_rgb(fmt):
    img = load_image(_encoded(Image.new("RGB", (40, 30), (250, 120, 0)), fmt))
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.abs(np.asarray(img, dtype=np.int16) - (250, 120, 0)).max() <= 8



def _oriented_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    """A blue JPEG stored at ``size`` with a red 32x32 top-left corner (as stored) and an EXIF
    Orientation tag."""
    img = Image.new("RGB", size, (20, 40, 200))
    img.paste((230, 20, 20), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _is_red(img: Image.Image, xy: tuple[int, int]) -> bool:
    return bool(np.abs(np.asarray(img.getpixel(xy), dtype=np.int16) - (230, 20, 20)).max() <= 24)


@pytest.mark.parametrize(("orientation", "upright", "red_corner"), [
    (1, (384, 192), (16, 16)),     # as stored: the corner stays top-left
    (3, (384, 192), (367, 175)),   # 180°: top-left goes bottom-right
    (6, (192, 384), (175, 16)),    # 90° clockwise: top-left goes top-right
])
def test_load_image_applies_the_exif_orientation(orientation, upright, red_corner):
    img = load_image(_oriented_jpeg((384, 192), orientation), field="images[0]")
    assert img.mode == "RGB" and img.size == upright
    assert _is_red(img, red_corner)
    assert not _is_red(img, (16, 16)) or orientation == 1
    assert img.getexif().get(0x0112) in (None, 1)  # applied once: no tag left to apply again


def test_an_edit_of_a_portrait_photo_stored_sideways_comes_out_portrait(golden_dir):
    checkpoint = load_checkpoint(golden_dir, device="cpu", dtype=torch.float32)
    consts = replace(checkpoint.config.constants, vae_min_px=64, vit_min_px=64)
    engine = Engine(replace(checkpoint, config=replace(checkpoint.config, constants=consts)))
    photo = load_image(_oriented_jpeg((128, 64), 6), field="images[0]")
    request = Request("edit", "make it red", images=[photo],
                      params=GenerationParams.for_task("edit", seed=1, num_timesteps=2))
    (result,) = engine.run([request])
    assert result.image.size == (64, 128)


def test_vit_patches_follow_the_conv_patch_embedding_order():
    torch.manual_seed(0)
    pixels = torch.randn(3, 28, 42)
    conv_weight = torch.randn(5, 3, 14, 14)
    bias = torch.randn(5)
    patches, pos = patchify_vit(pixels, 14, 70)
    assert patches.shape == (6, 588)
    linear_weight = conv_weight.permute(0, 2, 3, 1).reshape(5, 588)  # the checkpoint's Linear
    by_conv = F.conv2d(pixels[None], conv_weight, bias, stride=14)[0].flatten(1).T
    torch.testing.assert_close(patches @ linear_weight.T + bias, by_conv, atol=1e-4, rtol=1e-5)
    assert pos.tolist() == [0, 1, 2, 70, 71, 72]
    assert pos.dtype == torch.int64


def test_patchify_rejects_sizes_off_the_patch_grid():
    with pytest.raises(InputError, match=r"^image: 30x28 px is not a multiple of the 14 px patch"):
        patchify_vit(torch.zeros(3, 28, 30), 14, 70)
    with pytest.raises(InputError, match="exceed the 2 patches per side limit"):
        patchify_vit(torch.zeros(3, 42, 14), 14, 2)
    assert grid_position_ids(2, 3, 64).tolist() == [0, 1, 2, 64, 65, 66]


def test_pack_latent_matches_the_reference_packing_and_unpack_inverts_it(golden_dir):
    tensors = load_file(golden_dir / "golden" / "tensors.safetensors")
    latent = tensors["vae_roundtrip.latent_sampled"]
    packed = pack_latent(latent[:, :, :12, :16], 2)
    assert torch.equal(packed, tensors["vae_roundtrip.decode_in_packed"])
    assert torch.equal(unpack_latent(packed, 6, 8, 2, 16), latent[:, :, :12, :16])
    row = 1 * 8 + 2  # latent patch (i=1, j=2); column (p*2 + q)*16 + c
    assert packed[row, (1 * 2 + 0) * 16 + 5] == latent[0, 5, 2 * 1 + 1, 2 * 2 + 0]


def test_tensor_to_image_truncates_like_the_reference():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 6).expand(3, 1, 6)
    img = tensor_to_image(x.contiguous())
    assert img.mode == "RGB" and img.size == (6, 1)
    # 0 → 127.5 → 127 (truncated, not rounded); 0.999 → 254.87 → 254
    assert np.asarray(img)[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
