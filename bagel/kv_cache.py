"""The LLM's key/value cache: one preallocated slot pool shared by every context of a run.

Owns: the per-layer key and value storage (``[layers, capacity, Hkv, D]``), slot allocation
(a bump pointer: slots are written once and never reused within a run), writing new keys by
slot index (or a whole block of every layer at once: a saved context of an earlier run brought
back, ``write_block``), reading a context's keys back, and — for a paged cache — the page
discipline the variable-length flash kernels need. Leaves deciding what goes into a context to
``packing.py`` and the engine.

A context is a ``CacheSeq``: an ordered tuple of slot ranges plus the next RoPE position.
Because written slots are immutable, forking a context is free (``CacheSeq`` is a frozen value;
two contexts that share a prefix share its slots) — the image context of an edit is prefilled
once and every prompt and CFG branch that starts from it simply extends its own copy.
Keys are stored after RoPE, as the reference does.

Paged cache (``page_size`` set; the CUDA attention path): the same storage seen as pages of
``page_size`` slots (``pages()``: ``[layers, pages, page_size, Hkv, D]``), and a kernel reads
a context through its block table. Flash kernels require every page of a sequence but the
last to be full, so a paged cache keeps one invariant: every range of a context starts on a
page boundary and every range but the last is a whole number of pages. Extending a context
(``reserve``) continues in place when nothing was allocated after it; otherwise its partial
last page — fewer than ``page_size`` keys — is copied to the start of a fresh page and the
new keys follow it there (``Reservation.copy``, carried out by the next forward before it
reads them). The full pages of a shared context, which hold nearly all of its keys (a
1024-px product picture is ~9,000 keys, 35 full pages), are read by every fork in place.
An unpaged cache (``page_size`` None; the CPU's SDPA path) never copies.

Departures from the reference: the reference's ``NaiveCache`` holds one tensor per layer per
context and rebuilds it with a scatter on every update (and ``deepcopy`` to fork); here all
contexts live in one pool, a fork copies at most one partial page, and an update writes only
the new slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSeq:
    """One context: slot ranges ``[(start, end), ...]`` in order, and the next RoPE position."""

    ranges: tuple[tuple[int, int], ...] = ()
    rope: int = 0

    @property
    def length(self) -> int:
        return sum(end - start for start, end in self.ranges)

    @property
    def end(self) -> int | None:
        """The slot after the context's last key (None when empty)."""
        return self.ranges[-1][1] if self.ranges else None

    def with_range(self, start: int, count: int, rope_advance: int) -> CacheSeq:
        """This context extended by slots ``start..start+count`` (merged when contiguous)."""
        if count == 0:
            return CacheSeq(self.ranges, self.rope + rope_advance)
        ranges = list(self.ranges)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], start + count)
        else:
            ranges.append((start, start + count))
        return CacheSeq(tuple(ranges), self.rope + rope_advance)


EMPTY = CacheSeq()


@dataclass(frozen=True)
class SlotCopy:
    """Keys and values of slots ``src..src+count`` to be copied to ``dst..dst+count`` in every
    layer (a context's partial last page moved in front of a fork's new keys)."""

    src: int
    dst: int
    count: int


@dataclass(frozen=True)
class Reservation:
    """Room for new keys after a context: they go to ``start, start+1, ...``; ``base`` is the
    context they extend (its last range ends at ``start``, so ``base.with_range(start, n, r)``
    is the extended context), and ``copy`` must run before anything reads ``base``'s last page."""

    base: CacheSeq
    start: int
    copy: SlotCopy | None = None


class KVCache:
    """Slot pool: ``keys``/``values`` are ``[num_layers, capacity, Hkv, D]``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype, *, page_size: int | None = None) -> None:
        if page_size is not None and page_size < 1:
            raise ValueError(f"page_size: {page_size} must be a positive number of slots")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.page_size = page_size
        capacity = self.round_up(max(int(capacity), 16))
        self.keys = torch.empty(num_layers, capacity, num_kv_heads, head_dim, device=self.device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.used = 0
        self.grow_count = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def is_paged(self) -> bool:
        return self.page_size is not None

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def round_up(self, slots: int) -> int:
        """``slots`` rounded up to whole pages (unchanged when unpaged)."""
        page = self.page_size or 1
        return -(-slots // page) * page

    def allocate(self, count: int) -> int:
        """Reserve ``count`` fresh contiguous slots (starting on a page boundary when paged);
        returns the first. Grows the pool (one copy, logged) only when the caller's capacity
        estimate was too small."""
        start = self.round_up(self.used)
        self._ensure(start + count)
        self.used = start + count
        return start

    def _ensure(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        new_cap = self.round_up(max(slots, 2 * self.capacity))
        logger.info("kv cache grows from %d to %d slots", self.capacity, new_cap)
        keys = torch.empty(self.num_layers, new_cap, self.num_kv_heads, self.head_dim,
                           device=self.device, dtype=self.dtype)
        values = torch.empty_like(keys)
        keys[:, :self.used] = self.keys[:, :self.used]
        values[:, :self.used] = self.values[:, :self.used]
        self.keys, self.values = keys, values
        self.grow_count += 1

    def tail(self, seq: CacheSeq) -> int:
        """Keys on the context's partial last page (0 when unpaged or page-aligned)."""
        if not self.is_paged or not seq.ranges:
            return 0
        return (seq.ranges[-1][1] - seq.ranges[-1][0]) % self.page_size

    def reserve(self, seq: CacheSeq, count: int) -> Reservation:
        """Room for ``count`` new keys after ``seq`` (see the module docstring for pages)."""
        tail = self.tail(seq)
        if self.is_paged and seq.end is not None and seq.end == self.used:  # nothing after it: continue
            self._ensure(self.used + count)
            self.used += count
            return Reservation(seq, seq.end)
        if tail == 0:
            return Reservation(seq, self.allocate(count))
        start = self.allocate(tail + count)
        last_start, last_end = seq.ranges[-1]
        kept = seq.ranges[:-1] + (((last_start, last_end - tail),) if last_end - tail > last_start else ())
        base = CacheSeq(kept, seq.rope).with_range(start, tail, 0)
        return Reservation(base, start + tail, SlotCopy(last_end - tail, start, tail))

    def extend(self, seq: CacheSeq, count: int, rope_advance: int) -> tuple[CacheSeq, int, SlotCopy | None]:
        """Reserve ``count`` slots after ``seq``; returns the extended context, the first new
        slot and the page copy the next forward must carry out first (None if none)."""
        r = self.reserve(seq, count)
        return r.base.with_range(r.start, count, rope_advance), r.start, r.copy

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[n, Hkv, D]`` (after RoPE) at slots ``start..start+n``."""
        n = keys.shape[0]
        self.keys[layer, start:start + n] = keys
        self.values[layer, start:start + n] = values

    def write_block(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store ``keys``/``values`` ``[layers, n, Hkv, D]`` of every layer (a saved context's
        rows, see ``saved_contexts.py``) in ``n`` fresh contiguous slots; returns the first (on a
        page boundary when paged, so the block is a valid context range)."""
        n = keys.shape[1]
        start = self.allocate(n)
        self.keys[:, start:start + n] = keys
        self.values[:, start:start + n] = values
        return start

    def write_rows(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[n, Hkv, D]`` at the slots ``slots`` ``[n]`` (any order)."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

    def copy_rows(self, layer: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the keys and values at slots ``src`` ``[n]`` to slots ``dst`` ``[n]``."""
        self.write_rows(layer, dst, self.keys[layer].index_select(0, src), self.values[layer].index_select(0, src))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` ``[m]``: ``[m, Hkv, D]`` copies, one op each."""
        return self.keys[layer].index_select(0, slots), self.values[layer].index_select(0, slots)

    def read(self, layer: int, seq: CacheSeq) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[seq.length, Hkv, D]`` of a context (views when it is one range)."""
        if len(seq.ranges) == 1:
            start, end = seq.ranges[0]
            return self.keys[layer, start:end], self.values[layer, start:end]
        keys = torch.cat([self.keys[layer, s:e] for s, e in seq.ranges], dim=0)
        values = torch.cat([self.values[layer, s:e] for s, e in seq.ranges], dim=0)
        return keys, values

    def pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values as pages ``[pages, page_size, Hkv, D]`` (views)."""
        shape = (self.capacity // self.page_size, self.page_size, self.num_kv_heads, self.head_dim)
        return self.keys[layer].view(shape), self.values[layer].view(shape)
