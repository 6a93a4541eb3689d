"""The layout of one packed forward for variable-length flash kernels over a paged KV cache.

Owns: turning a forward's segments (query rows, cached context, own keys) into what a
``varlen_attn`` / ``flash_attn_varlen_func`` call takes — ``cu_seq_q``, a block table of pages
per segment, ``seqused_k`` (keys per segment) and ``cu_seq_k``, ``max_q``/``max_k`` — plus the
cache slot every row's key is written to and the page copies to carry out first. Pure
bookkeeping on the host; the tensors are built once per layout (``packing.PackBuilder.build``).
Leaves the kernels to ``attention.py`` and the page discipline to ``kv_cache.py``.

A segment's keys are its context (``Segment.past``) followed by its own rows. Cached segments
(prefill, decode) write their own rows after their context's reserved slots. Query blocks that
are not cached (denoising) park their keys in scratch pages: the context's partial last page
is copied to the start of the segment's scratch run, its own rows follow, and the block table
lists the context's full pages (read in place, shared by every branch and request over that
context) and then the scratch pages.

Flash kernels take one causal flag per call and align the causal mask bottom-right. Causal
text segments of more than one row and the other segments (image blocks, single decode
tokens, for which causal and full attention coincide) are therefore two calls when a forward
holds both; a call over a subset of the rows names them (``VarlenCall.rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from bagel.kv_cache import CacheSeq, KVCache, SlotCopy

if TYPE_CHECKING:
    from bagel.packing import Segment


@dataclass(frozen=True)
class VarlenCall:
    """One kernel call: segments with the same causal flag; their query rows (None: every row
    of the forward, in order), and the kernel's metadata (int32 on the device)."""

    causal: bool
    rows: torch.Tensor | None  # [Tq] long
    cu_seq_q: torch.Tensor  # [n+1]
    cu_seq_k: torch.Tensor  # [n+1], cumulated seqused_k
    seqused_k: torch.Tensor  # [n]
    block_table: torch.Tensor  # [n, max pages]
    max_q: int
    max_k: int
    total_k: int  # sum of seqused_k
    page_size: int

    @cached_property
    def key_slots(self) -> torch.Tensor:
        """The cache slot of every key of the call, segment after segment ``[total_k]`` (long,
        on the device): what a kernel without block tables reads through ``KVCache.gather``.
        Built on the device without a sync, once per layout (every layer and step reuse it)."""
        table = self.block_table
        segment = torch.repeat_interleave(torch.arange(table.shape[0], device=table.device),
                                          self.seqused_k.long(), output_size=self.total_k)
        position = torch.arange(self.total_k, device=table.device) - self.cu_seq_k.long()[segment]
        page = table[segment, position // self.page_size].long()
        return page * self.page_size + position % self.page_size


@dataclass(frozen=True)
class VarlenLayout:
    """Everything a forward's attention needs on a paged cache."""

    write_slots: torch.Tensor  # [L] long, the cache slot of every row's key and value
    copy_src: torch.Tensor | None  # [m] long, slots copied to copy_dst before anything is read
    copy_dst: torch.Tensor | None
    calls: tuple[VarlenCall, ...]


def scratch_slots(segments: Sequence[Segment], cache: KVCache) -> int:
    """Scratch slots the uncached segments need: per segment its context's partial last page
    plus its own rows, rounded up to whole pages."""
    return sum(cache.round_up(cache.tail(seg.past) + seg.query_len)
               for seg in segments if seg.write_start is None)


def _pages(seq: CacheSeq, page: int) -> list[int]:
    out: list[int] = []
    for k, (start, end) in enumerate(seq.ranges):
        if start % page or (k < len(seq.ranges) - 1 and (end - start) % page):
            raise ValueError(f"slot ranges {seq.ranges} break the page layout (page size {page})")
        out.extend(range(start // page, -(-end // page)))
    return out


def _segment_keys(segments: Sequence[Segment], cache: KVCache, scratch_start: int | None
                 ) -> tuple[list[CacheSeq], list[int], list[SlotCopy]]:
    """Every segment's keys as a paged context, the slot of every row's key, and the page
    copies scratch runs need."""
    keys: list[CacheSeq] = []
    writes: list[int] = []
    copies: list[SlotCopy] = []
    offset = scratch_start
    for seg in segments:
        if seg.write_start is not None:
            own = seg.write_start
            keys.append(seg.past.with_range(own, seg.query_len, 0))
        else:
            if offset is None:
                raise ValueError("a segment that is not cached needs scratch slots on a paged cache")
            tail = cache.tail(seg.past)
            start, end = seg.past.ranges[-1] if seg.past.ranges else (0, 0)
            kept = seg.past.ranges[:-1] + (((start, end - tail),) if end - tail > start else ())
            if tail:
                copies.append(SlotCopy(end - tail, offset, tail))
            own = offset + tail
            keys.append(CacheSeq(kept, seg.past.rope).with_range(offset, tail + seg.query_len, 0))
            offset += cache.round_up(tail + seg.query_len)
        writes.extend(range(own, own + seg.query_len))
    return keys, writes, copies


def _call(segments: list[tuple[int, Segment]], keys: list[CacheSeq], page: int, causal: bool,
          every_row: bool, device: torch.device | str) -> VarlenCall:
    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device)

    q_lens = [seg.query_len for _, seg in segments]
    k_lens = [keys[i].length for i, _ in segments]
    tables = [_pages(keys[i], page) for i, _ in segments]
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for r, t in enumerate(tables):
        table[r, :len(t)] = torch.tensor(t, dtype=torch.int32)
    rows = None if every_row else torch.tensor(
        [r for _, seg in segments for r in range(seg.query_start, seg.query_start + seg.query_len)],
        dtype=torch.long).to(device)
    return VarlenCall(causal, rows, int32([0, *_cumsum(q_lens)]), int32([0, *_cumsum(k_lens)]), int32(k_lens),
                      table.to(device), max(q_lens), max(k_lens), sum(k_lens), page)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def build_varlen(segments: Sequence[Segment], cache: KVCache, length: int, copies: Sequence[SlotCopy],
                 device: torch.device | str, scratch_start: int | None) -> VarlenLayout:
    """The varlen layout of a forward over ``segments`` (which tile its ``length`` rows);
    ``copies`` are the page copies its reservations made (``PackBuilder.add_copy``)."""
    keys, writes, scratch_copies = _segment_keys(segments, cache, scratch_start)
    assert len(writes) == length, "segments tile the forward's rows"
    all_copies = [*copies, *scratch_copies]
    src = [c.src + k for c in all_copies for k in range(c.count)]
    dst = [c.dst + k for c in all_copies for k in range(c.count)]
    causal = [(i, seg) for i, seg in enumerate(segments) if seg.is_causal and seg.query_len > 1]
    full = [(i, seg) for i, seg in enumerate(segments) if not (seg.is_causal and seg.query_len > 1)]
    in_order = all(seg.query_start == prev.query_start + prev.query_len
                   for prev, seg in zip(segments, segments[1:])) and segments[0].query_start == 0
    calls = tuple(_call(group, keys, cache.page_size, flag, in_order and len(group) == len(segments), device)
                  for group, flag in ((causal, True), (full, False)) if group)

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device)

    return VarlenLayout(long(writes), long(src) if src else None, long(dst) if dst else None, calls)
