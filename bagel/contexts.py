"""Context prefill: builds the KV contexts of many requests, sharing every common prefix.

Owns: describing a context as a path of items (a text segment, a picture's VAE block, a
picture's ViT block), prefilling the items of all requests level by level — one packed LLM
forward per level, holding every new item of every request — and remembering each prefix's
``CacheSeq`` so that requests and CFG branches with a common prefix (the same system prompt,
the same product picture) prefill it once. Also the picture encodes that feed those blocks
(SigLIP for ViT blocks, VAE latents handed in by the engine), and registering a prefix whose
keys come from elsewhere (``import_prefix``: a saved context of an earlier run, see
``saved_contexts.py``) so that only the items after it are prefilled. Leaves deciding which
contexts a task needs to ``engine.py`` and decoding/denoising to ``loops.py``.

In ``naive`` mode every item is its own forward (the reference's one-update-per-call shape);
results are the same up to float summation order.

Departures from the reference: the reference prefills each context of each request
separately (``deepcopy`` of the cache per CFG branch) and recomputes identical prefixes; here
identical prefixes are computed once. Identical inputs give identical keys, so this changes
no result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bagel.kv_cache import EMPTY, CacheSeq, KVCache
from bagel.model import BagelModel
from bagel.packing import PackBuilder, prompt_ids
from bagel.tokenizer import Tokenizer


@dataclass(frozen=True)
class TextItem:
    """A text segment ``<|im_start|>`` + tokens + ``<|im_end|>``."""

    text: str


@dataclass(frozen=True)
class VitItem:
    """A picture's SigLIP block; ``image_key`` names a ``VitInput``."""

    image_key: str


@dataclass(frozen=True)
class VaeItem:
    """A picture's clean-latent block; ``latent_key`` names a packed latent."""

    latent_key: str


Item = TextItem | VitItem | VaeItem
ContextPath = tuple[Item, ...]


@dataclass
class VitInput:
    """One picture ready for SigLIP: patches ``[N, P]`` and grid ids ``[N]``."""

    patches: torch.Tensor
    position_ids: torch.Tensor


@dataclass
class LatentInput:
    """One clean latent ready for the LLM: packed ``[h·w, p·p·z]`` and grid ids ``[h·w]``."""

    packed: torch.Tensor
    position_ids: torch.Tensor


@dataclass
class Counters:
    """Work done, per request index and for the whole run."""

    llm_forwards: dict[int, int] = field(default_factory=dict)
    context_encodes: dict[int, int] = field(default_factory=dict)
    run_llm_forwards: int = 0
    run_context_encodes: int = 0
    denoise_seconds: float = 0.0  # wall time of the denoising loops (device synced at each end)
    denoise_forward_rows: int = 0  # packed rows fed to the LLM by the denoising loops
    prefill_rows: int = 0  # packed rows fed to the LLM by context prefills (the gate's included)
    # query blocks (one image's CFG branch at one step) computed in full / predicted by TaylorSeer
    blocks_full: dict[int, int] = field(default_factory=dict)
    blocks_cached: dict[int, int] = field(default_factory=dict)
    encoded_pictures: set[str] = field(default_factory=set)  # a picture counts once per run
    # wall seconds per phase of the run (encode, prefill, think, denoise, decode), device synced
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def forward(self, owners: set[int]) -> None:
        self.run_llm_forwards += 1
        for i in owners:
            self.llm_forwards[i] = self.llm_forwards.get(i, 0) + 1

    def block(self, owner: int, *, full: bool) -> None:
        counts = self.blocks_full if full else self.blocks_cached
        counts[owner] = counts.get(owner, 0) + 1

    def encode(self, owner: int, picture_key: str) -> None:
        """One picture's context encode: its VAE and SigLIP passes count once together."""
        if picture_key in self.encoded_pictures:
            return
        self.encoded_pictures.add(picture_key)
        self.run_context_encodes += 1
        self.context_encodes[owner] = self.context_encodes.get(owner, 0) + 1


class ContextStore:
    """Every prefilled prefix of a run, by path. ``vit_inputs`` / ``latents`` hold the pictures
    the paths name."""

    def __init__(self, model: BagelModel, tokenizer: Tokenizer, cache: KVCache, counters: Counters,
                 *, naive: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.counters = counters
        self.naive = naive
        self.vit_inputs: dict[str, VitInput] = {}
        self.latents: dict[str, LatentInput] = {}
        self._vit_rows: dict[str, torch.Tensor] = {}
        self._nodes: dict[ContextPath, CacheSeq] = {(): EMPTY}
        self._text_ids: dict[str, list[int]] = {}

    def text_ids(self, text: str) -> list[int]:
        if text not in self._text_ids:
            self._text_ids[text] = prompt_ids(self.tokenizer.encode(text), self.tokenizer.bos_id,
                                              self.tokenizer.eos_id)
        return self._text_ids[text]

    def get(self, path: ContextPath) -> CacheSeq:
        return self._nodes[path]

    def has(self, path: ContextPath) -> bool:
        return path in self._nodes

    def import_prefix(self, path: ContextPath, ends: Sequence[tuple[int, int]], keys: torch.Tensor,
                      values: torch.Tensor) -> None:
        """Register ``path`` and every prefix of it as prefilled with ``keys``/``values`` ``[layers,
        n, Hkv, D]`` (after RoPE; ``ends[k]``: the rows and the RoPE position after item k). The
        rows go to fresh slots as one range — on a paged cache starting on a page, so each prefix
        is a valid context and a fork of one moves only its partial last page — unless every
        prefix is in the store already; prefixes already there are kept."""
        missing = [k for k in range(len(path)) if path[:k + 1] not in self._nodes]
        if not missing:
            return
        start = self.cache.write_block(keys, values)
        for k in missing:
            rows, rope = ends[k]
            self._nodes[path[:k + 1]] = CacheSeq(((start, start + rows),), rope)

    def prefill(self, paths: Sequence[ContextPath], owners: Sequence[int]) -> None:
        """Make sure every path (and so every prefix of it) is in the cache. ``owners[k]`` is
        the request index path k belongs to (for the counters)."""
        depth = 0
        longest = max((len(p) for p in paths), default=0)
        while depth < longest:
            todo: dict[ContextPath, set[int]] = {}
            for path, owner in zip(paths, owners):
                if len(path) > depth and path[:depth + 1] not in self._nodes:
                    todo.setdefault(path[:depth + 1], set()).add(owner)
            if todo:
                groups = [[p] for p in todo] if self.naive else [list(todo)]
                for group in groups:
                    self._forward(group, {p: todo[p] for p in group})
            depth += 1

    def _vit_rows_for(self, keys: list[str], owners: dict[str, int]) -> None:
        """SigLIP + connector rows for pictures not encoded yet, in one packed call."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._vit_rows]
        if not missing:
            return
        inputs = [self.vit_inputs[k] for k in missing]
        device = self.model.device
        lens = [x.patches.shape[0] for x in inputs]
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        patches = torch.cat([x.patches for x in inputs]).to(device)
        pos = torch.cat([x.position_ids for x in inputs]).to(device)
        rows = self.model.embed_vit(patches, pos, cu)
        for key, part in zip(missing, rows.split(lens)):
            self._vit_rows[key] = part
            self.counters.encode(owners[key], key)

    def _forward(self, group: list[ContextPath], owners: dict[ContextPath, set[int]]) -> None:
        tok = self.tokenizer
        builder = PackBuilder(self.cache)
        vit_keys, latent_keys = [], []
        for path in group:
            past, item = self._nodes[path[:-1]], path[-1]
            if isinstance(item, TextItem):
                self._nodes[path] = builder.add_text(self.text_ids(item.text), past)
            elif isinstance(item, VitItem):
                n = self.vit_inputs[item.image_key].patches.shape[0]
                self._nodes[path], _ = builder.add_image_block("vit", n, past, tok.start_of_image_id,
                                                               tok.end_of_image_id)
                vit_keys.append(item.image_key)
            else:
                n = self.latents[item.latent_key].packed.shape[0]
                self._nodes[path], _ = builder.add_image_block("latent", n, past, tok.start_of_image_id,
                                                               tok.end_of_image_id)
                latent_keys.append(item.latent_key)
        first_owner = {}
        for path in group:
            if isinstance(path[-1], VitItem):
                first_owner.setdefault(path[-1].image_key, min(owners[path]))
        self._vit_rows_for(vit_keys, first_owner)
        device, model = self.model.device, self.model
        batch = builder.build(device)
        lm = model.language_model
        text_rows = lm.embed(batch.text_ids)
        x = text_rows.new_zeros(batch.length, text_rows.shape[1])
        x[batch.text_index] = text_rows
        if vit_keys:
            x[batch.row_index["vit"]] = torch.cat([self._vit_rows[k] for k in vit_keys])
        if latent_keys:
            lat = [self.latents[k] for k in latent_keys]
            packed = torch.cat([v.packed for v in lat]).to(device)
            pos = torch.cat([v.position_ids for v in lat]).to(device)
            zero_t = torch.zeros(1, device=device)
            x[batch.row_index["latent"]] = model.embed_latents(packed, zero_t, pos)
        lm(x, batch, self.cache)
        self.counters.forward(set().union(*owners.values()))
        self.counters.prefill_rows += batch.length
