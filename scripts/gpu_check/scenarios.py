"""The requests the checks run: pictures, prompts and the try-on chunk.

Owns: a deterministic stand-in product photo (as PNG bytes and decoded, as the worker decodes
an upload), the text-to-image, edit, think, understand and batch requests of each check, and
the try-on chunk — built as the worker builds one (``worker.params`` try-on defaults and
prompt template, ``worker.gpu.picture_context_seed`` of the product's bytes on every scene, so
the product is encoded and prefilled once). Every request is seeded. Leaves running them to
the checks.
"""

from __future__ import annotations

import io
from dataclasses import fields
from functools import lru_cache

from PIL import Image

from bagel.bench import product_picture as bench_picture
from bagel.config import GenerationParams
from bagel.requests import Request
from bagel.transforms import load_image
from worker.gpu import picture_context_seed
from worker.params import engine_prompt, resolve

SCENES = (
    "a sunlit beach at golden hour",
    "a marble cafe table in Paris",
    "a wooden shelf in a cosy bookshop",
    "a hook in a minimalist white studio",
    "wet city pavement at night with neon reflections",
    "moss in a misty pine forest",
    "a hotel bed with crisp linen sheets",
    "the passenger seat of a vintage car",
)
IDEAS = ("a lamp shaped like a jellyfish", "a teapot that is also a city", "a bicycle made of glass",
         "a chair designed by a snail")
T2I_PROMPT = "A leather handbag on a marble table, soft studio light, photographed from the side."
EDIT_PROMPT = "Place the bag on a sunlit beach at golden hour."
THINK_PROMPT = "Design a backpack for a whale, and explain the design before drawing it."
QUESTION = "What object is shown, and what colour is it?"
_PARAM_NAMES = frozenset(f.name for f in fields(GenerationParams))


@lru_cache(maxsize=8)
def product_png(px: int, seed: int = 1) -> bytes:
    """The benchmark's ``px``-square stand-in product photo (``bagel.bench.product_picture``) as PNG."""
    buf = io.BytesIO()
    bench_picture(px, seed).save(buf, format="PNG")
    return buf.getvalue()


def product_picture(px: int, seed: int = 1) -> Image.Image:
    """The product photo decoded as the worker decodes an upload."""
    return load_image(product_png(px, seed), field="product")


def t2i(px: int, steps: int, seed: int = 11, prompt: str = T2I_PROMPT, **params) -> Request:
    """A text-to-image request with the task defaults (cfg_interval [0.4, 1])."""
    return Request("generate", prompt, width=px, height=px,
                   params=GenerationParams(num_timesteps=steps, seed=seed, **params))


def edit(px: int, steps: int, seed: int = 21) -> Request:
    return Request("edit", EDIT_PROMPT, images=[product_picture(px)],
                   params=GenerationParams.for_task("edit", num_timesteps=steps, seed=seed))


def generations(px: int, steps: int, count: int, **params) -> list[Request]:
    """``count`` generations with different prompts, seeds and (every other one) a 3:4 shape."""
    out = []
    for k in range(count):
        width = px if k % 2 == 0 else px * 3 // 4
        out.append(Request("generate", f"Design {IDEAS[k % len(IDEAS)]}.", width=width, height=px,
                           params=GenerationParams(num_timesteps=steps, seed=100 + k, **params)))
    return out


def understand(px: int, tokens: int) -> Request:
    return Request("understand", QUESTION, images=[product_picture(px)],
                   params=GenerationParams(max_new_tokens=tokens, seed=5))


def think(px: int, tokens: int) -> Request:
    """A generation with a think text of up to ``tokens`` tokens; the picture is small and
    2 timesteps long, so the decode is most of the time."""
    return Request("generate", THINK_PROMPT, think=True, width=px, height=px,
                   params=GenerationParams(max_think_tokens=tokens, num_timesteps=2, seed=7))


def tryon_chunk(px: int, steps: int, count: int = 8, *, taylorseer: bool = False) -> list[Request]:
    """A try-on chunk: ``count`` scenes of one ``px``-square product, as the worker builds it."""
    png = product_png(px)
    picture = product_picture(px)
    seed = picture_context_seed(png)
    out = []
    for k in range(count):
        resolved = resolve("tryon", {"num_timesteps": steps, "seed": 300 + k, "taylorseer": taylorseer}, False)
        params = GenerationParams(**{name: v for name, v in resolved.items() if name in _PARAM_NAMES})
        out.append(Request("edit", engine_prompt("tryon", SCENES[k % len(SCENES)]), images=[picture],
                           params=params, context_seed=seed))
    return out
