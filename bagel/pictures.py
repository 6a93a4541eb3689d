"""Input pictures on their way into a context, and the side of an output picture.

Owns: checking and resizing an input picture as the reference does (``prepare_picture``: RGB,
the VAE resize, then the ViT resize and its patches) under a key that names its pixels; snapping
a requested output side to the latent stride (``snap_side``); and the VAE blocks of a run
(``LatentSpec``: a picture with its posterior noise, given as a tensor or as a seed, under a key
that names both; ``encode_latents``: one VAE encoder pass per distinct picture, then one
posterior sample per distinct noise). Every request kind — an edit's input picture, an
interleaved request's pictures — goes through these. Leaves which pictures a request has and
which blocks it reads to ``engine.py`` / ``interleaved.py``, SigLIP to ``contexts.py``.

Departures from the reference: the reference encodes a picture once per request and context;
here once per run whatever the number of noises, and a seeded noise is drawn only when its
latent is needed (a latent whose context a saved context already holds is never drawn).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from bagel import transforms
from bagel.config import ModelConfig
from bagel.contexts import ContextStore, Counters, LatentInput, VitInput
from bagel.errors import InputError
from bagel.vae import AutoEncoder


@dataclass
class Picture:
    """An input picture after the reference's resizes."""

    key: str
    vae_image: Image.Image  # VAE-resized RGB picture
    vit: VitInput


@dataclass
class LatentSpec:
    """One VAE block to make: ``picture`` sampled with ``noise`` ``[1, z, H/8, W/8]``, or with the
    noise a generator seeded with ``seed`` draws on the device. ``owner``: the first request
    index that uses it (for the counters)."""

    owner: int
    picture: Picture
    key: str
    noise: torch.Tensor | None = None
    seed: int | None = None


def image_key(img: Image.Image) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _tensor_key(t: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(t.shape)).encode())
    h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def noised(picture: Picture, noise: torch.Tensor, owner: int) -> LatentSpec:
    """A VAE block sampled with a given noise (keyed by its values: equal draws share a block)."""
    return LatentSpec(owner, picture, f"{picture.key}:{_tensor_key(noise)}", noise=noise)


def seeded_key(picture_key: str, seed: int) -> str:
    """The key of a picture's VAE block sampled with the noise of seed ``seed``."""
    return f"{picture_key}:seed:{seed}"


def seeded(picture: Picture, seed: int, owner: int) -> LatentSpec:
    """A VAE block sampled with the noise of a generator seeded with ``seed`` (keyed by the seed:
    nothing is drawn until ``encode_latents`` needs it)."""
    return LatentSpec(owner, picture, seeded_key(picture.key, seed), seed=seed)


def noise_shape(picture: Picture, config: ModelConfig) -> tuple[int, int, int, int]:
    """The posterior noise of ``picture``: ``(1, z, H/8, W/8)`` of its VAE-resized size."""
    w, h = picture.vae_image.size
    return (1, config.vae.z_channels, h // config.vae.downsample, w // config.vae.downsample)


def prepare_picture(img: Image.Image, field_name: str, config: ModelConfig) -> Picture:
    """``img`` resized for the VAE and then for SigLIP; errors name ``field_name``."""
    consts = config.constants
    if not isinstance(img, Image.Image):
        raise InputError(f"{field_name}: a decoded PIL picture is required, got {type(img).__name__}")
    try:
        rgb = transforms.to_rgb(img)
        vae_img = transforms.resize_for_vae(rgb, consts)
        vit_img = transforms.resize_for_vit(vae_img, consts)
        patches, pos = transforms.patchify_vit(transforms.image_to_tensor(vit_img), config.vit.patch_size,
                                               consts.vit_max_num_patch_per_side)
    except InputError as exc:
        raise InputError(f"{field_name}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{field_name}: cannot be read as a picture ({exc})") from exc
    return Picture(image_key(rgb), vae_img, VitInput(patches, pos))


def snap_side(value: int, field_name: str, config: ModelConfig) -> int:
    """A requested output side snapped to the nearest multiple of the latent stride (at least one
    stride); beyond the model's maximum side it is an error naming ``field_name``."""
    stride = config.constants.latent_downsample(config.vae)
    limit = config.constants.max_image_side_px(config.vae)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{field_name}: {value!r} must be a positive number of pixels")
    if value > limit:
        raise InputError(f"{field_name}: {value} px exceeds the {limit} px maximum side")
    return min(limit, max(stride, (value + stride // 2) // stride * stride))


def check_init_noise(noise: torch.Tensor | None, out_hw: tuple[int, int] | None, field_name: str,
                     config: ModelConfig) -> None:
    """An injected initial noise must be packed ``[h·w, p·p·z]`` for the output picture."""
    if noise is None:
        return
    if out_hw is None:
        raise InputError(f"{field_name}: a request whose output is text generates no picture")
    stride = config.constants.latent_downsample(config.vae)
    expected = ((out_hw[0] // stride) * (out_hw[1] // stride),
                config.constants.latent_patch_size ** 2 * config.vae.z_channels)
    if tuple(noise.shape) != expected:
        raise InputError(f"{field_name}: shape {tuple(noise.shape)} given, expected {expected} for a "
                         f"{out_hw[1]}x{out_hw[0]} px output")


def encode_latents(vae: AutoEncoder, config: ModelConfig, device: torch.device, specs: list[LatentSpec],
                   store: ContextStore, counters: Counters) -> None:
    """Put every spec's packed latent into ``store.latents``: one VAE encoder pass per distinct
    picture, then one posterior sample per distinct key of it (seeded noises drawn now, on
    ``device``)."""
    consts = config.constants
    by_picture: dict[str, dict[str, LatentSpec]] = {}
    for spec in specs:
        by_picture.setdefault(spec.picture.key, {}).setdefault(spec.key, spec)
    p = consts.latent_patch_size
    for distinct in by_picture.values():
        first = next(iter(distinct.values()))
        noises = []
        for spec in distinct.values():
            noise = spec.noise
            if noise is None:
                generator = torch.Generator(device=device).manual_seed(spec.seed)
                noise = torch.randn(noise_shape(spec.picture, config), generator=generator, device=device)
            noises.append(noise.to(device, torch.float32))
        pixels = transforms.image_to_tensor(first.picture.vae_image).to(device)[None]
        mean, logvar = vae.posterior(pixels)
        latents = vae.sample(mean, logvar, noise=torch.cat(noises))
        counters.encode(min(spec.owner for spec in distinct.values()), first.picture.key)
        h, w = latents.shape[2] // p, latents.shape[3] // p
        pos = transforms.grid_position_ids(h, w, consts.max_latent_size)
        for k, key in enumerate(distinct):
            store.latents[key] = LatentInput(transforms.pack_latent(latents[k:k + 1].float(), p), pos)
