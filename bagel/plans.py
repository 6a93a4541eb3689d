"""A planned request and what it will cost: the engine's per-request state and its footprint.

Owns: ``Picture`` (an input picture after the reference's resizes), ``Plan`` (one validated
request and everything the engine's steps compute for it on the way) and ``footprint``, the
counts one plan adds to a run — KV slots of its contexts, decodes and gate questions, rows of
its packed forwards, its widest attention segments, its latents — which ``memory.py`` turns
into bytes. Leaves validating and running requests to ``engine.py``.

The counts err on the high side (see ``memory.py``): a context is counted per request even
where requests share it, except the picture blocks named in ``shared_kv``, which are counted
once per run under a key that equal pictures (with equal posterior noise) share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from bagel.config import ModelConfig
from bagel.contexts import ContextPath, VitInput
from bagel.loops import ImageJob, TextJob, branch_names
from bagel.memory import Footprint
from bagel.requests import Request
from bagel.sampler import make_schedule
from bagel.sizes import resized_size, vae_size
from bagel.tokenizer import Tokenizer


@dataclass
class Picture:
    """An input picture after the reference's resizes."""

    key: str
    vae_image: Image.Image  # VAE-resized RGB picture
    vit: VitInput


@dataclass
class Plan:
    """One validated request and everything computed for it on the way."""

    index: int
    request: Request
    seed: int
    generator: torch.Generator
    pictures: list[Picture]
    out_hw: tuple[int, int] | None = None  # output picture (H, W) px for generate/edit
    latent_key: str | None = None
    main: ContextPath = ()
    text_uncond: ContextPath = ()
    img_uncond: ContextPath | None = ()
    think_text: str | None = None
    reply: str | None = None
    text_job: TextJob | None = None
    image_job: ImageJob | None = None
    canceled: bool = False
    trace: dict = field(default_factory=dict)


def vit_patches(width: int, height: int, config: ModelConfig) -> int:
    """SigLIP patches of a width×height picture after the VAE and ViT resizes (a result picture
    the gate judges goes through both, as an input picture does)."""
    consts = config.constants
    w, h = vae_size(width, height, consts)
    w, h = resized_size(w, h, max_px=consts.vit_max_px, min_px=consts.vit_min_px, stride=consts.vit_stride,
                        max_pixels=consts.max_pixels)
    return (w // config.vit.patch_size) * (h // config.vit.patch_size)


def footprint(plan: Plan, tokenizer: Tokenizer, config: ModelConfig) -> Footprint:
    """What ``plan`` adds to a run (see ``memory.py``); its picture blocks are ``shared_kv``
    under a key that equal pictures with equal posterior noise (and think flag) share."""
    req, p = plan.request, plan.request.params
    stride = config.constants.latent_downsample(config.vae)
    own = 2 * (len(tokenizer.encode(req.prompt)) + 4) + 64
    if req.think:
        own += 3 * (p.max_think_tokens + 2) + 64
    if req.task == "understand":
        own += p.max_new_tokens + 2
    picture_rows = sum(pic.vit.patches.shape[0] + 2 for pic in plan.pictures)
    shared_key = (tuple(pic.key for pic in plan.pictures), req.think)
    loop_rows, latent_elems, out_px, in_px, q = 0, 0, 0, 0, 0
    if req.task == "edit":
        pic = plan.pictures[0]
        w, h = pic.vae_image.size
        picture_rows += (h // stride) * (w // stride) + 2
        in_px = w * h
        noise_id = (("context_seed", req.context_seed) if req.context_seed is not None
                    else ("noise", id(req.posterior_noise)) if req.posterior_noise is not None
                    else ("seed", plan.seed))
        shared_key = (*shared_key, noise_id)
    if plan.out_hw is not None:
        h, w = plan.out_hw[0] // stride, plan.out_hw[1] // stride
        q = h * w + 2
        schedule = make_schedule(p.num_timesteps, p.timestep_shift, p.cfg_interval)
        has_img_context = req.task == "edit" or req.think
        branches = {name for on in schedule.cfg_on for name in branch_names(p, on, has_img_context)}
        loop_rows = len(branches) * q
        latent_elems = h * w * config.constants.latent_patch_size ** 2 * config.vae.z_channels
        out_px = plan.out_hw[0] * plan.out_hw[1]
    context = own + picture_rows
    prefill = own + picture_rows
    segments = [(q, context + q), (prefill, prefill)]
    # cache allocations: each of (at most) three contexts' items — think prompt, a VAE and a
    # ViT block per picture, the prompt — plus the think text, the decode and one scratch
    # run per CFG branch of the denoising step
    blocks = loop_rows // max(q, 1)
    allocations = 3 * (2 + 2 * len(plan.pictures)) + 2 + blocks
    shared_kv = [(repr(shared_key), picture_rows)]
    gate_kv, gate_rows, questions = 0, 0, len(req.gate_questions)
    if questions and plan.out_hw is not None:
        # the gate (gate.py): per question, the input pictures' ViT blocks (a prefix shared by
        # every request on the same pictures), the result's ViT block (shared by the request's
        # questions), the question and one decoded token
        inputs = sum(pic.vit.patches.shape[0] + 2 for pic in plan.pictures)
        result = vit_patches(plan.out_hw[1], plan.out_hw[0], config) + 2
        texts = [len(tokenizer.encode(text)) + 2 for text in req.gate_questions]
        gate_kv = result + sum(texts) + questions
        gate_rows = inputs + gate_kv
        segments += [(result, inputs + result), (max(texts), inputs + result + max(texts))]
        allocations += len(plan.pictures) + 1 + 2 * questions
        shared_kv.append((repr(("gate", tuple(pic.key for pic in plan.pictures))), inputs))
    widest = max(segments, key=lambda s: s[0] * s[1])
    taylor_rows = (p.taylorseer_order + 1) * (q - 2) * blocks if p.taylorseer and blocks else 0
    return Footprint(own + gate_kv, loop_rows, widest, prefill, latent_elems, out_px, in_px,
                     shared_kv=tuple(shared_kv), loop_segments=((q, context + q),) * blocks,
                     allocations=allocations, taylor_rows=taylor_rows, gate_rows=gate_rows, gate_answers=questions)
