"""FLUX autoencoder against the reference goldens (case ``vae_roundtrip``), float32 on CPU."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel.config import BagelConstants, VAEConfig
from bagel.errors import InputError
from bagel.transforms import (
    image_to_tensor,
    load_image,
    pack_latent,
    resize_for_vae,
    tensor_to_image,
    to_rgb,
    unpack_latent,
)
from bagel.vae import AutoEncoder

ATOL = 1e-4


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float = ATOL):
    assert got.shape == expected.shape, f"{name}: {tuple(got.shape)} != {tuple(expected.shape)}"
    diff = (got.float() - expected.float()).abs()
    assert diff.max() <= atol, (f"{name}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} "
                                f"(atol {atol})")


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(golden_dir / "golden" / "tensors.safetensors")


@pytest.fixture(scope="module")
def vae(golden_dir):
    model = AutoEncoder(VAEConfig.from_folder(golden_dir))
    model.load_state_dict(load_file(golden_dir / "ae.safetensors"), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def picture(golden_dir):
    raw = load_image((golden_dir / "golden" / "img_a2.png").read_bytes())
    return image_to_tensor(resize_for_vae(to_rgb(raw), BagelConstants()))[None]


@pytest.fixture(scope="module")
def encoded(vae, picture, golden):
    with torch.inference_mode():
        sampled = vae.encode(picture, noise=golden["vae_roundtrip.vae_posterior_noise"])
        mean = vae.encode_mean(picture)
    return sampled, mean


def test_state_dict_keys_are_the_checkpoint_keys_and_build_on_meta(golden_dir):
    with torch.device("meta"):
        model = AutoEncoder(VAEConfig.from_folder(golden_dir))
    stored = load_file(golden_dir / "ae.safetensors")
    ours = model.state_dict()
    assert set(ours) == set(stored)
    assert all(ours[k].shape == stored[k].shape for k in stored)
    assert all(t.device.type == "meta" for t in ours.values())


def test_full_size_flux_config_builds_on_meta():
    with torch.device("meta"):
        model = AutoEncoder(VAEConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 83_000_000 < n < 84_000_000  # the FLUX autoencoder has about 83.8 M parameters


def test_encode_with_injected_posterior_noise_matches_reference(encoded, golden, picture):
    assert picture.shape == (1, 3, 512, 576)
    sampled, _ = encoded
    assert_close("latent_sampled", sampled, golden["vae_roundtrip.latent_sampled"])


def test_encode_mean_matches_reference(encoded, golden):
    _, mean = encoded
    assert_close("latent_mean", mean, golden["vae_roundtrip.latent_mean"])


def test_decode_matches_reference_raw_output_and_picture(vae, golden, golden_dir):
    packed = golden["vae_roundtrip.decode_in_packed"]
    with torch.inference_mode():
        out = vae.decode(unpack_latent(packed, 96 // 16, 128 // 16, 2, 16))
    assert_close("decode_out_raw", out, golden["vae_roundtrip.decode_out_raw"])
    got = np.asarray(tensor_to_image(out[0]), dtype=np.int16)
    expected = np.asarray(Image.open(golden_dir / "golden" / "vae_roundtrip.decoded.png"),
                          dtype=np.int16)
    assert got.shape == expected.shape == (96, 128, 3)
    assert np.abs(got - expected).max() <= 1


def test_encoded_crop_packs_to_the_reference_decode_input(encoded, golden):
    sampled, _ = encoded
    assert_close("decode_in_packed", pack_latent(sampled[:, :, :12, :16], 2),
                 golden["vae_roundtrip.decode_in_packed"])


def test_generator_sampling_is_seeded_and_centred_on_the_mean(vae):
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.inference_mode():
        a = vae.encode(x, generator=torch.Generator().manual_seed(7))
        b = vae.encode(x, generator=torch.Generator().manual_seed(7))
        c = vae.encode(x, generator=torch.Generator().manual_seed(8))
        mean = vae.encode_mean(x)
        zero = vae.encode(x, noise=torch.zeros_like(mean))
    assert a.shape == (1, 16, 4, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert_close("zero-noise sample vs mean", zero, mean, atol=1e-6)


def test_encode_rejects_noise_of_the_wrong_shape(vae):
    with pytest.raises(InputError, match=r"^noise: shape \(1, 16, 4, 4\) given, the posterior "
                                         r"of this picture has shape \(1, 16, 4, 6\)$"):
        vae.encode(torch.zeros(1, 3, 32, 48), noise=torch.zeros(1, 16, 4, 4))


def test_bfloat16_weights_run_in_bfloat16_close_to_float32(vae, golden):
    packed = golden["vae_roundtrip.decode_in_packed"]
    z = unpack_latent(packed, 6, 8, 2, 16)
    half = AutoEncoder(vae.cfg).to(torch.bfloat16)
    half.load_state_dict(vae.state_dict())
    with torch.inference_mode():
        out = half.decode(z)
    assert out.dtype == torch.bfloat16
    reference = golden["vae_roundtrip.decode_out_raw"]
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 0.05, f"bf16 decode relative error {rel:.3g}"
