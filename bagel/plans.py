"""A planned request and what it will cost: the engine's per-request state and its footprint.

Owns: ``Plan`` (one validated request — a fixed task or an interleaved one — and everything the
engine's steps compute for it on the way) and ``footprint``, the counts one plan adds to a run —
KV slots of its contexts, decodes and gate questions, rows of its packed forwards, its widest
attention segments, its latents, the rows of a context it keeps — which ``memory.py`` turns into
bytes. Leaves validating and running requests to ``engine.py`` and ``interleaved.py``.

The counts err on the high side (see ``memory.py``): a context is counted per request even
where requests share it, except a fixed task's picture blocks named in ``shared_kv``, which are
counted once per run under a key that equal pictures (with equal posterior noise) share. An
interleaved request's whole main context is its own; the rows a saved context brings back
(``saved_contexts.py``) are the first rows of that context, so they are counted there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bagel.config import ModelConfig
from bagel.contexts import ContextPath
from bagel.loops import ImageJob, TextJob, branch_names
from bagel.memory import Footprint
from bagel.pictures import LatentSpec, Picture
from bagel.prompts import think_system_prompt
from bagel.requests import InterleavedRequest, Request
from bagel.sampler import make_schedule
from bagel.saved_contexts import PartKey, SavedContext
from bagel.sizes import resized_size, vae_size
from bagel.tokenizer import Tokenizer


@dataclass
class Plan:
    """One validated request and everything computed for it on the way. ``pictures``: the
    request's input pictures in order (an interleaved request: one per ``ImagePart``)."""

    index: int
    request: Request | InterleavedRequest
    seed: int
    generator: torch.Generator
    pictures: list[Picture]
    out_hw: tuple[int, int] | None = None  # output picture (H, W) px when the output is an image
    latents: list[LatentSpec] = field(default_factory=list)  # the VAE blocks its contexts read
    part_keys: tuple[PartKey, ...] = ()  # an interleaved request's parts (saved_contexts.py)
    part_ends: tuple[int, ...] = ()  # main context items up to the end of each part
    keep_context: bool = False  # copy the main context out after the prefill
    given_context: SavedContext | None = None  # a saved context the caller handed in
    saved: SavedContext | None = None
    reused_parts: int = 0
    rows_saved: int = 0
    main: ContextPath = ()
    text_uncond: ContextPath = ()
    img_uncond: ContextPath | None = ()
    think_text: str | None = None
    reply: str | None = None
    text_job: TextJob | None = None
    image_job: ImageJob | None = None
    canceled: bool = False
    trace: dict = field(default_factory=dict)

    @property
    def is_interleaved(self) -> bool:
        return isinstance(self.request, InterleavedRequest)

    @property
    def output(self) -> str:
        """"text" (understand, a text output) or "image"."""
        if isinstance(self.request, InterleavedRequest):
            return self.request.output
        return "text" if self.request.task == "understand" else "image"

    @property
    def gate_questions(self) -> tuple[str, ...]:
        return () if isinstance(self.request, InterleavedRequest) else self.request.gate_questions


def vit_patches(width: int, height: int, config: ModelConfig) -> int:
    """SigLIP patches of a width×height picture after the VAE and ViT resizes (a result picture
    the gate judges goes through both, as an input picture does)."""
    consts = config.constants
    w, h = vae_size(width, height, consts)
    w, h = resized_size(w, h, max_px=consts.vit_max_px, min_px=consts.vit_min_px, stride=consts.vit_stride,
                        max_pixels=consts.max_pixels)
    return (w // config.vit.patch_size) * (h // config.vit.patch_size)


def footprint(plan: Plan, tokenizer: Tokenizer, config: ModelConfig) -> Footprint:
    """What ``plan`` adds to a run (see ``memory.py``); a fixed task's picture blocks are
    ``shared_kv`` under a key that equal pictures with equal posterior noise (and think flag)
    share."""
    if plan.is_interleaved:
        return _interleaved_footprint(plan, tokenizer, config)
    req, p = plan.request, plan.request.params
    stride = config.constants.latent_downsample(config.vae)
    own = 2 * (len(tokenizer.encode(req.prompt)) + 4) + 64
    if req.think:
        own += 3 * (p.max_think_tokens + 2) + 64
    if req.task == "understand":
        own += p.max_new_tokens + 2
    picture_rows = sum(pic.vit.patches.shape[0] + 2 for pic in plan.pictures)
    shared_key = (tuple(pic.key for pic in plan.pictures), req.think)
    in_px = 0
    if req.task == "edit":
        pic = plan.pictures[0]
        w, h = pic.vae_image.size
        picture_rows += (h // stride) * (w // stride) + 2
        in_px = w * h
        noise_id = (("context_seed", req.context_seed) if req.context_seed is not None
                    else ("noise", id(req.posterior_noise)) if req.posterior_noise is not None
                    else ("seed", plan.seed))
        shared_key = (*shared_key, noise_id)
    q, loop_rows, latent_elems, out_px = _image_loop(plan, config, req.task == "edit" or req.think)
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


def _image_loop(plan: Plan, config: ModelConfig, has_img_context: bool) -> tuple[int, int, int, int]:
    """An image output's query block rows ``q``, rows per denoising step, latent elements and
    pixels (all 0 for a text output)."""
    if plan.out_hw is None:
        return 0, 0, 0, 0
    p = plan.request.params
    stride = config.constants.latent_downsample(config.vae)
    h, w = plan.out_hw[0] // stride, plan.out_hw[1] // stride
    q = h * w + 2
    schedule = make_schedule(p.num_timesteps, p.timestep_shift, p.cfg_interval)
    branches = {name for on in schedule.cfg_on for name in branch_names(p, on, has_img_context)}
    latent_elems = h * w * config.constants.latent_patch_size ** 2 * config.vae.z_channels
    return q, len(branches) * q, latent_elems, plan.out_hw[0] * plan.out_hw[1]


def _interleaved_footprint(plan: Plan, tokenizer: Tokenizer, config: ModelConfig) -> Footprint:
    """An interleaved request's counts: its main context (think prompt, texts and every picture
    block it reads), the image-free context's texts again, the decode and the denoising loop.
    Nothing is shared with other requests; a kept context's copy is ``saved_rows``."""
    req, p = plan.request, plan.request.params
    stride = config.constants.latent_downsample(config.vae)
    image_out = req.output == "image"
    text_rows = 0
    if req.think:  # the think system prompt leads every context
        text_rows = len(tokenizer.encode(think_system_prompt("generate" if image_out else "understand"))) + 2
    picture_rows, items, in_px = 0, int(req.think), 0
    pictures = iter(plan.pictures)
    for key in plan.part_keys:  # ("text", text) or ("image", picture key, ViT block, VAE block, seed)
        if key[0] == "text":
            text_rows += len(tokenizer.encode(key[1])) + 2
            items += 1
            continue
        pic, has_vit, has_vae = next(pictures), key[2], key[3]
        if has_vit:
            picture_rows += pic.vit.patches.shape[0] + 2
            items += 1
        if has_vae:
            w, h = pic.vae_image.size
            picture_rows += (h // stride) * (w // stride) + 2
            in_px = max(in_px, w * h)
            items += 1
    main = text_rows + picture_rows
    own = main + (text_rows if image_out else 0) + 64
    if req.think:
        own += 3 * (p.max_think_tokens + 2) + 64
    if not image_out:
        own += p.max_new_tokens + 2
    q, loop_rows, latent_elems, out_px = _image_loop(plan, config, req.think or picture_rows > 0)
    blocks = loop_rows // max(q, 1)
    segments = [(q, own + q), (own, own)]  # a denoising block; every context prefilled as one segment
    # cache allocations: each of three contexts' items, the imported rows of a saved context,
    # the think text, the decode and one scratch run per CFG branch of the denoising step
    allocations = 3 * (items + 1) + 1 + 2 + blocks
    taylor_rows = (p.taylorseer_order + 1) * (q - 2) * blocks if p.taylorseer and blocks else 0
    return Footprint(own, loop_rows, max(segments, key=lambda s: s[0] * s[1]), own, latent_elems, out_px, in_px,
                     loop_segments=((q, own + q),) * blocks, allocations=allocations, taylor_rows=taylor_rows,
                     saved_rows=main if plan.keep_context else 0)
