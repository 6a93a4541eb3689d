"""Packing: text, ViT patches and VAE latents of many contexts into one LLM forward.

Owns: the layout of one packed forward — which rows are text tokens (and their ids), which
rows take ViT features or latent tokens, the RoPE position of every row, which rows use the
generation expert, and for every segment the cached context it attends to, whether it is
causal and where its new keys are written. Pure bookkeeping on the host; tensors are built
once per forward in ``PackBuilder.build``. Leaves embedding and the forward itself to the
engine and ``llm.py``.

Conventions (observed in the reference, see the fixture README):
  * a text segment is ``<|im_start|>`` + ids + ``<|im_end|>``, causal, consecutive positions;
  * an image block is ``<|vision_start|>`` + tokens + ``<|vision_end|>``, bidirectional, every
    row at the context's current position; afterwards the position advances by one;
  * the denoising query block has the same shape, sits at its own context's position and
    writes nothing to the cache;
  * latent rows (clean VAE context tokens and noisy query tokens) use the generation expert,
    everything else the understanding expert.

When every segment of a forward has the same length and they tile its rows in order (a
denoising step: one query block per request and CFG branch; a decode step: one token per
stream), ``build`` also lays out the batched attention (``UniformAttention``): the cache slot
each row's key is written to (scratch slots for query blocks, which are not cached), and per
group of segments with similar key counts the slots each segment reads, padded, with a mask.

Departures from the reference: the reference builds index tensors for a merged key sequence
(cache + new rows) per forward; here a segment names its cached context and the attention
reads the cache directly (per segment) or through one gather per group (batched).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bagel.kv_cache import CacheSeq, KVCache, SlotCopy
from bagel.paged import VarlenLayout, build_varlen, scratch_slots

ROW_KINDS = ("vit", "latent")


@dataclass(frozen=True)
class Segment:
    """Rows ``query_start..query_start+query_len`` attend to ``past`` plus themselves."""

    query_start: int
    query_len: int
    past: CacheSeq
    is_causal: bool
    write_start: int | None  # first cache slot for this segment's keys; None: not cached


@dataclass(frozen=True)
class Block:
    """Where one image block's inner rows sit in the packed sequence."""

    row_start: int
    num_rows: int

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.num_rows)


@dataclass(frozen=True)
class AttentionGroup:
    """Consecutive segments ``first..first+count`` attended in one call: segment s reads cache
    slots ``key_slots[s]`` (its context, then its own rows; padded) where ``key_mask[s]`` is True."""

    first: int
    count: int
    key_slots: torch.Tensor  # [count·Kmax] long
    key_mask: torch.Tensor  # [count, 1, 1 or q, Kmax] bool


@dataclass(frozen=True)
class UniformAttention:
    """The layout of batched attention for a forward whose segments all have the same query
    length and tile its rows in order (a denoising step, a decode step): every row's key goes
    to ``write_slots`` first, then each run of segments with similar key counts (the shortest
    padded by at most ``MAX_PADDING`` of the longest) is one attention call."""

    num_segments: int
    query_len: int
    write_slots: torch.Tensor  # [L] long, cache slot of every row's key and value
    groups: tuple[AttentionGroup, ...]


MAX_PADDING = 0.2  # no segment of a group pads more than this share of the group's key width
# A forward whose understanding rows are at most this share (a denoising step: two markers per
# query block) runs the generation expert densely over all rows and redoes only those few rows
# with the understanding expert — cheaper than gathering and scattering every generation row.
GEN_DENSE_MAX_UND_SHARE = 1 / 32


@dataclass
class PackedBatch:
    """One forward's layout, as tensors on the model's device. ``gen_index`` is None when every
    row uses the understanding expert; ``uniform`` is None when the segments differ in length
    (a prefill), and attention then runs per segment."""

    length: int
    positions: torch.Tensor  # [L] long
    segments: list[Segment]
    text_ids: torch.Tensor  # [Nt] long
    text_index: torch.Tensor  # [Nt] long, rows of the text tokens
    row_index: dict[str, torch.Tensor]  # kind -> [N] long rows (vit / latent)
    gen_index: torch.Tensor | None
    und_index: torch.Tensor | None
    uniform: UniformAttention | None = None
    gen_dense: bool = False  # few understanding rows: run the generation expert on every row
    varlen: VarlenLayout | None = None  # a paged cache's layout for the varlen kernels


@dataclass
class PackBuilder:
    """Accumulates segments for one forward. Methods return the context as it will be once the
    forward has run (new keys written), so callers chain contexts without waiting."""

    cache: KVCache | None = None
    _positions: list[int] = field(default_factory=list)
    _segments: list[Segment] = field(default_factory=list)
    _text_ids: list[int] = field(default_factory=list)
    _text_rows: list[int] = field(default_factory=list)
    _rows: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in ROW_KINDS})
    _copies: list[SlotCopy] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self._positions)

    def add_copy(self, copy: SlotCopy | None) -> None:
        """A page copy the forward carries out before it reads anything (``KVCache.reserve``)."""
        if copy is not None:
            self._copies.append(copy)

    def _reserve(self, past: CacheSeq, count: int, write: bool) -> tuple[CacheSeq, int | None]:
        """The context the new rows attend to (``past``, its partial last page possibly moved)
        and the first slot of their keys (None: not cached)."""
        if not write:
            return past, None
        if self.cache is None:
            raise ValueError("a segment that writes the cache needs a PackBuilder with a cache")
        r = self.cache.reserve(past, count)
        self.add_copy(r.copy)
        return r.base, r.start

    def add_text(self, ids: list[int], past: CacheSeq, *, write: bool = True,
                 slot: int | None = None) -> CacheSeq:
        """A causal run of text tokens at positions ``past.rope, past.rope+1, ...``. ``slot``:
        write into these already allocated slots (a decode loop's reservation) instead of
        allocating new ones."""
        start = self.length
        if slot is None:
            past, slot = self._reserve(past, len(ids), write)
        new = past if slot is None else past.with_range(slot, len(ids), len(ids))
        self._positions.extend(range(past.rope, past.rope + len(ids)))
        self._text_ids.extend(ids)
        self._text_rows.extend(range(start, start + len(ids)))
        self._segments.append(Segment(start, len(ids), past, True, slot))
        return new

    def add_image_block(self, kind: str, num_rows: int, past: CacheSeq, start_id: int, end_id: int,
                        *, write: bool = True) -> tuple[CacheSeq, Block]:
        """``start_id`` + ``num_rows`` rows of ``kind`` + ``end_id``, bidirectional, all at
        ``past.rope``; the context's position then advances by one."""
        if kind not in ROW_KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {ROW_KINDS}")
        start = self.length
        total = num_rows + 2
        past, slot = self._reserve(past, total, write)
        new = past if slot is None else past.with_range(slot, total, 1)
        self._positions.extend([past.rope] * total)
        self._text_ids.extend([start_id, end_id])
        self._text_rows.extend([start, start + total - 1])
        self._rows[kind].extend(range(start + 1, start + 1 + num_rows))
        self._segments.append(Segment(start, total, past, False, slot))
        return new, Block(start + 1, num_rows)

    def scratch_slots(self) -> int:
        """Cache slots a forward whose query blocks are not cached parks their keys in (see
        ``build``): one per row, or on a paged cache whole pages per segment."""
        if self.cache is not None and self.cache.is_paged:
            return scratch_slots(self._segments, self.cache)
        return self.length

    def uniform_rows(self) -> int | None:
        """The common query length when the segments tile the rows in equal runs, else None."""
        if not self._segments:
            return None
        q = self._segments[0].query_len
        if any(seg.query_len != q or seg.query_start != k * q for k, seg in enumerate(self._segments)):
            return None
        return q

    def _uniform(self, device: torch.device | str, scratch_start: int | None) -> UniformAttention | None:
        q = self.uniform_rows()
        if q is None or (scratch_start is None and any(seg.write_start is None for seg in self._segments)):
            return None
        writes, keys = [], []
        for k, seg in enumerate(self._segments):
            first = seg.write_start if seg.write_start is not None else scratch_start + k * q
            own = torch.arange(first, first + q)
            writes.append(own)
            keys.append(torch.cat([*(torch.arange(a, b) for a, b in seg.past.ranges), own]))
        groups, start = [], 0
        for end in range(1, len(keys) + 1):
            lengths = [k.numel() for k in keys[start:end + 1]]
            if end == len(keys) or min(lengths) < (1 - MAX_PADDING) * max(lengths):
                groups.append(self._group(start, keys[start:end], q, device))
                start = end
        return UniformAttention(len(keys), q, torch.cat(writes).to(device), tuple(groups))

    def _group(self, first: int, keys: list[torch.Tensor], q: int, device: torch.device | str) -> AttentionGroup:
        segments = self._segments[first:first + len(keys)]
        width = max(k.numel() for k in keys)
        key_slots = torch.zeros(len(keys), width, dtype=torch.long)
        causal = q > 1 and any(seg.is_causal for seg in segments)
        mask = torch.zeros(len(keys), 1, q if causal else 1, width, dtype=torch.bool)
        for k, (slots, seg) in enumerate(zip(keys, segments)):
            key_slots[k, :slots.numel()] = slots
            if seg.is_causal and q > 1:  # bottom-right causal: row i sees its past and own rows ≤ i
                mask[k, 0] = torch.arange(width)[None, :] <= torch.arange(q)[:, None] + seg.past.length
            else:
                mask[k, 0, :, :slots.numel()] = True
        return AttentionGroup(first, len(keys), key_slots.flatten().to(device), mask.to(device))

    def build(self, device: torch.device | str, *, scratch_start: int | None = None) -> PackedBatch:
        """The layout as tensors. ``scratch_start``: first of ``scratch_slots()`` cache slots
        where the keys of segments that are not cached (denoising query blocks) may be parked
        for one batched attention call; without it such a forward attends per segment (SDPA;
        a paged cache needs them)."""
        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(device)

        gen_rows = self._rows["latent"]
        if gen_rows:
            is_gen = torch.zeros(self.length, dtype=torch.bool)
            is_gen[gen_rows] = True
            gen_index = torch.nonzero(is_gen).squeeze(1).to(device)
            und_index = torch.nonzero(~is_gen).squeeze(1).to(device)
        else:
            gen_index = und_index = None
        paged = self.cache is not None and self.cache.is_paged
        return PackedBatch(
            length=self.length,
            positions=tensor(self._positions),
            segments=list(self._segments),
            text_ids=tensor(self._text_ids),
            text_index=tensor(self._text_rows),
            row_index={k: tensor(v) for k, v in self._rows.items()},
            gen_index=gen_index,
            und_index=und_index,
            uniform=None if paged else self._uniform(device, scratch_start),
            gen_dense=bool(gen_rows) and self.length - len(gen_rows) <= GEN_DENSE_MAX_UND_SHARE * self.length,
            varlen=(build_varlen(self._segments, self.cache, self.length, self._copies, device, scratch_start)
                    if paged else None),
        )


def prompt_ids(token_ids: list[int], bos_id: int, eos_id: int) -> list[int]:
    """The ids the reference prefills for one text segment: BOS + ids + EOS, no template."""
    return [bos_id, *token_ids, eos_id]
