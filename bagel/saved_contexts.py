"""Saved contexts: the KV of a request's prefilled main context, kept by the caller between runs.

Owns: ``SavedContext`` (a copy of the keys and values of an interleaved request's main context
after its input parts — before any think text or output — per layer, on the engine's device,
with the identity of what it holds), the identity of the engine that may read one back
(``owner_key``), checking what a caller hands back (``check_list``), copying one out of a run's
cache (``save``), finding how much of a new request's context one holds (``common_prefix``) and
bringing that much back into a run (``restore``). Leaves the cache slots of the rows brought
back to ``ContextStore.import_prefix`` and which requests keep or reuse contexts to
``engine.py``.

Why it is exact: a context item's keys depend only on the items before it (text is causal, a
picture block attends to itself and the past), so the keys of a prefix are the same whatever
follows it, and keys are stored after RoPE at absolute positions. So the first rows of a saved
context are the prefilled start of any later request whose first parts are the same — the same
texts, the same pictures with the same blocks and the same posterior noise. That identity is
checked, never trusted: a part is reused when its key (``parts``: its text, or its picture's key,
its blocks and its noise seed) and its context items (``path``, the think system prompt
included) equal the new request's, and so are those of every part before it; ``owner`` must
name the same model object, configuration (the picture transforms included), dtype, device and
forward hooks (a LoRA applied with ``adapters.apply_adapter`` changes every key; its hooks are
new each time it is applied, so a context made under an adapter is never read back in another
run). A saved context that is a prefix of the new request's parts is reused whole; one that
parts from it later (a session whose turns alternate text and picture outputs: a text output
reads a picture through its ViT block only, a picture output through both) is reused up to
there; one that differs from the first part on, or that this engine cannot read, is not an
error: the request is prefilled from scratch.

Departures from the reference: the reference keeps no context between calls.
"""

from __future__ import annotations

import hashlib
import secrets
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from bagel.config import ModelConfig
from bagel.contexts import ContextPath, ContextStore
from bagel.errors import InputError
from bagel.kv_cache import KVCache

# One key per input part: ("text", text) or ("image", picture key, has ViT block, has VAE
# block, posterior-noise seed or None without a VAE block).
PartKey = tuple
# A random token per loaded model object: two engines on the same modules share contexts, a
# model loaded again does not (its weights may differ).
_MODEL_TOKENS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class SavedContext:
    """The main context of one request after its parts: ``keys``/``values`` ``[layers, rows, Hkv,
    D]`` on the engine's device (after RoPE), ``path`` its items, ``ends[k]`` the rows and the
    RoPE position after item k, ``parts`` the keys of the parts it covers, ``part_ends[k]`` the
    items up to the end of part k (the think system prompt counts with the first), ``owner`` the
    engine identity that made it."""

    owner: str
    parts: tuple[PartKey, ...] = field(repr=False)
    part_ends: tuple[int, ...]
    path: ContextPath = field(repr=False)
    ends: tuple[tuple[int, int], ...] = field(repr=False)
    keys: torch.Tensor = field(repr=False)
    values: torch.Tensor = field(repr=False)

    @property
    def rows(self) -> int:
        return self.ends[-1][0]

    @property
    def rope(self) -> int:
        """The RoPE position the next item would start at."""
        return self.ends[-1][1]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def owner_key(model: nn.Module, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> str:
    """The identity of an engine's keys as they are now (see the module docstring)."""
    token = _MODEL_TOKENS.setdefault(model, secrets.token_hex(8))
    hooks = sorted(id(hook) for module in model.modules() for hook in module._forward_hooks.values())
    return hashlib.blake2b(repr((token, config, str(dtype), str(device), hooks)).encode(), digest_size=16).hexdigest()


def check_list(contexts: list[SavedContext | None] | None, n: int) -> list[SavedContext | None]:
    """``run``'s ``contexts``: one ``SavedContext`` or None per request (None: none at all)."""
    if contexts is None:
        return [None] * n
    if not isinstance(contexts, list | tuple) or len(contexts) != n:
        got = len(contexts) if isinstance(contexts, list | tuple) else type(contexts).__name__
        raise InputError(f"contexts: {got} given for {n} requests; one SavedContext or None per request")
    for k, saved in enumerate(contexts):
        if saved is not None and not isinstance(saved, SavedContext):
            raise InputError(f"contexts[{k}]: a SavedContext or None is required, got {type(saved).__name__}")
    return list(contexts)


def save(store: ContextStore, path: ContextPath, parts: tuple[PartKey, ...], part_ends: tuple[int, ...],
         owner: str) -> SavedContext:
    """A copy of the prefilled context ``path`` (every prefix of it is in ``store``): one gather
    of its slots for the keys and one for the values, all layers at once. On a paged cache a
    prefix may have been forked with its partial last page moved; the copy holds the same keys,
    so the first ``ends[k]`` rows of ``path`` are the keys of its first k+1 items."""
    cache = store.cache
    nodes = [store.get(path[:k + 1]) for k in range(len(path))]
    slots = torch.cat([torch.arange(a, b) for a, b in nodes[-1].ranges]).to(cache.keys.device)
    return SavedContext(owner, tuple(parts), tuple(part_ends), tuple(path),
                        tuple((node.length, node.rope) for node in nodes),
                        cache.keys.index_select(1, slots), cache.values.index_select(1, slots))


def _readable(saved: SavedContext, owner: str, cache: KVCache) -> bool:
    """Made by this engine as it is now, whole, and shaped for ``cache``."""
    n = len(saved.path)
    if saved.owner != owner or n == 0 or len(saved.ends) != n or len(saved.part_ends) != len(saved.parts):
        return False
    if not saved.parts or saved.part_ends[-1] != n or any(b < a for a, b in zip(saved.part_ends, saved.part_ends[1:])):
        return False
    rows = [end[0] for end in saved.ends]
    if any(b <= a for a, b in zip([0, *rows], rows)):
        return False
    shape = (cache.num_layers, saved.rows, cache.num_kv_heads, cache.head_dim)
    return all(tuple(t.shape) == shape and t.dtype == cache.dtype and t.device == cache.keys.device
               for t in (saved.keys, saved.values))


def common_prefix(saved: SavedContext, owner: str, parts: tuple[PartKey, ...], path: ContextPath,
                  cache: KVCache) -> tuple[int, int]:
    """``(parts, items)``: how many leading parts of a request (part keys ``parts``, main path
    ``path``) ``saved`` holds — whole parts whose keys and items agree, each with every part
    before it — and the items they span; ``(0, 0)`` when none, or when ``saved`` cannot be read
    into ``cache`` (see the module docstring)."""
    if not _readable(saved, owner, cache):
        return 0, 0
    reused = items = 0
    for k, (mine, theirs) in enumerate(zip(parts, saved.parts)):
        end = saved.part_ends[k]
        if mine != theirs or tuple(path[items:end]) != saved.path[items:end]:
            break
        reused, items = k + 1, end
    return reused, items


def restore(saved: SavedContext, store: ContextStore, owner: str, parts: tuple[PartKey, ...],
            path: ContextPath) -> tuple[int, int]:
    """Bring the rows of the leading parts ``saved`` shares with a request (``common_prefix``)
    into ``store`` as the prefilled start of its main context ``path``; returns the parts and
    the rows brought back, ``(0, 0)`` when none."""
    reused, items = common_prefix(saved, owner, parts, path, store.cache)
    if not items:
        return 0, 0
    rows = saved.ends[items - 1][0]
    store.import_prefix(saved.path[:items], saved.ends[:items], saved.keys[:, :rows], saved.values[:, :rows])
    return reused, rows
