"""Interleaved requests: texts and pictures in any order, answered with a text or a picture.

Owns: planning an ``InterleavedRequest`` against the model (``plan``: its pictures resized, its
context length, output size and initial noise checked, errors naming ``requests[i].<field>``),
the identity of each of its parts (``part_keys``: what a saved context is matched on), its
contexts (``build_paths``) and the VAE blocks they read (``latent_specs``). Leaves running it to
``engine.py``, resizing and encoding pictures to ``pictures.py`` and its footprint to
``plans.py``.

Contexts (the reference's ``interleave_inference``): all three start empty, or with the think
system prompt when think is on (the understanding one for a text output, the generation one for
an image). Then part by part: a text — the text-free CFG context becomes the main context as it
is before the text, and the text is appended to the main and the image-free contexts; a
picture — its blocks are appended to the main context (the VAE latent block when the output is
an image and the part has ``generate``, then the ViT block when it has ``understand``), and the
text-free context becomes the main context after it. So the text-free context is the main
context up to just before the last text (all of it when a picture follows the last text), and
the image-free context is the think prompt and every text. A text output decodes its answer
from the main context (the understand task's shape: the CFG contexts are not built). An image
output decodes the think text first when think is on, appends it to the main context and
denoises with the three contexts; its size is the last VAE-encoded picture's (VAE-resized),
else the requested width×height snapped to the latent stride.

So [picture (ViT only), question] is the understand task, [prompt] the generate task (its
image-free context, the main context itself without think, is not built: the conditional
velocity stands in, as for generate) and [picture, instruction] the edit task with that
picture's noise seed as ``context_seed``.

Posterior noise: each VAE-encoded picture's own (``ImagePart.noise_seed``, else
``requests.picture_noise_seed`` of its pixels), never the request's seed, so a prefix's keys are
the same in every turn of a session; the request's generator draws only the initial noise and
sampled text.

Departures from the reference: the reference encodes every picture of an image output through
both blocks (of a text output through ViT only); here a part may ask for one. The reference
draws posterior noise from the global RNG; here from the picture's own seed.
"""

from __future__ import annotations

import torch

from bagel.config import ModelConfig
from bagel.contexts import ContextPath, TextItem, VaeItem, VitItem
from bagel.errors import InputError
from bagel.pictures import (
    LatentSpec,
    Picture,
    check_init_noise,
    prepare_picture,
    seeded,
    seeded_key,
    snap_side,
)
from bagel.plans import Plan
from bagel.prompts import think_system_prompt
from bagel.requests import ImagePart, InterleavedRequest, TextPart, picture_noise_seed
from bagel.saved_contexts import PartKey
from bagel.tokenizer import Tokenizer

POSITION_MARGIN = 256  # positions kept free beyond the prompt and think text, as for the fixed tasks


def think_prompt(req: InterleavedRequest) -> str:
    """The think system prompt of ``req``: the understanding one for a text output."""
    return think_system_prompt("understand" if req.output == "text" else "generate")


def part_keys(req: InterleavedRequest, pictures: list[Picture]) -> tuple[PartKey, ...]:
    """One key per part (``saved_contexts.PartKey``): its text, or its picture's key, whether it
    has a ViT block and a VAE block here, and its noise seed when it has a VAE block."""
    keys: list[PartKey] = []
    pics = iter(pictures)
    for part in req.parts:
        if isinstance(part, TextPart):
            keys.append(("text", part.text))
            continue
        pic = next(pics)
        vae = part.generate and req.output == "image"
        seed = None
        if vae:
            seed = part.noise_seed if part.noise_seed is not None else picture_noise_seed(part.image)
        keys.append(("image", pic.key, part.understand, vae, seed))
    return tuple(keys)


def plan(index: int, req: InterleavedRequest, seed: int, generator: torch.Generator, config: ModelConfig,
         tokenizer: Tokenizer) -> Plan:
    """``req`` validated against the model and planned (see the module docstring)."""
    where = f"requests[{index}]"
    pictures = [prepare_picture(part.image, f"{where}.parts[{k}].image", config)
                for k, part in enumerate(req.parts) if isinstance(part, ImagePart)]
    planned = Plan(index, req, seed, generator, pictures)
    planned.part_keys = part_keys(req, pictures)
    positions = len(tokenizer.encode(think_prompt(req))) + 2 if req.think else 0
    for key in planned.part_keys:  # a text takes its tokens and two markers, a picture block one
        positions += len(tokenizer.encode(key[1])) + 2 if key[0] == "text" else int(key[2]) + int(key[3])
    think = req.params.max_think_tokens + 2 if req.think else 0
    limit = config.llm.max_position_embeddings
    if positions + think + POSITION_MARGIN > limit:
        raise InputError(f"{where}.parts: {positions} positions (+{think} think tokens) exceed the "
                         f"{limit}-position context of the model")
    if req.output == "image":
        encoded = [pic for pic, key in zip(pictures, (k for k in planned.part_keys if k[0] == "image")) if key[3]]
        if encoded:
            w, h = encoded[-1].vae_image.size
            planned.out_hw = (h, w)
        else:
            planned.out_hw = (snap_side(req.height, f"{where}.height", config),
                              snap_side(req.width, f"{where}.width", config))
    check_init_noise(req.init_noise, planned.out_hw, f"{where}.init_noise", config)
    return planned


def build_paths(planned: Plan) -> None:
    """Set the main, text-free and image-free context paths of an interleaved plan, and the
    number of main items up to the end of each part."""
    req = planned.request
    head: ContextPath = (TextItem(think_prompt(req)),) if req.think else ()
    main = text_free = image_free = head
    ends = []
    for key in planned.part_keys:
        if key[0] == "text":
            text_free = main
            main = (*main, TextItem(key[1]))
            image_free = (*image_free, TextItem(key[1]))
        else:
            _, picture_key, vit, vae, seed = key
            if vae:
                main = (*main, VaeItem(seeded_key(picture_key, seed)))
            if vit:
                main = (*main, VitItem(picture_key))
            text_free = main
        ends.append(len(main))
    planned.main, planned.part_ends = main, tuple(ends)
    if req.output == "text":
        planned.text_uncond, planned.img_uncond = (), None
        return
    planned.text_uncond = text_free
    # None: the image-free context is the main context itself (no picture, no think text)
    planned.img_uncond = None if image_free == main and not req.think else image_free


def latent_specs(planned: Plan) -> list[LatentSpec]:
    """The VAE blocks of an interleaved plan, each sampled with its picture's own seed."""
    image_keys = [key for key in planned.part_keys if key[0] == "image"]
    return [seeded(pic, key[4], planned.index) for pic, key in zip(planned.pictures, image_keys) if key[3]]
