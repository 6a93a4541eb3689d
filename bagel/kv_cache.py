"""The LLM's key/value cache: one preallocated slot pool shared by every context of a run.

Owns: the per-layer key and value storage (``[layers, capacity, Hkv, D]``), slot allocation
(a bump pointer: slots are written once and never reused within a run), writing new keys by
slot index, and reading a context's keys back as views. Leaves deciding what goes into a
context to ``packing.py`` and the engine.

A context is a ``CacheSeq``: an ordered tuple of slot ranges plus the next RoPE position.
Because written slots are immutable, forking a context is free (``CacheSeq`` is a frozen value;
two contexts that share a prefix share its slots) — the image context of an edit is prefilled
once and every prompt and CFG branch that starts from it simply extends its own copy.
Keys are stored after RoPE, as the reference does.

Departures from the reference: the reference's ``NaiveCache`` holds one tensor per layer per
context and rebuilds it with a scatter on every update (and ``deepcopy`` to fork); here all
contexts live in one pool, a fork copies nothing, and an update writes only the new slots.
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


class KVCache:
    """Slot pool: ``keys``/``values`` are ``[num_layers, capacity, Hkv, D]``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.dtype = dtype
        capacity = max(int(capacity), 16)
        self.keys = torch.empty(num_layers, capacity, num_kv_heads, head_dim, device=self.device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.used = 0
        self.grow_count = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def allocate(self, count: int) -> int:
        """Reserve ``count`` fresh contiguous slots; returns the first. Grows the pool (one copy,
        logged) only when the caller's capacity estimate was too small."""
        start = self.used
        if start + count > self.capacity:
            new_cap = max(start + count, 2 * self.capacity)
            logger.info("kv cache grows from %d to %d slots", self.capacity, new_cap)
            keys = torch.empty(self.num_layers, new_cap, self.num_kv_heads, self.head_dim,
                               device=self.device, dtype=self.dtype)
            values = torch.empty_like(keys)
            keys[:, :start] = self.keys[:, :start]
            values[:, :start] = self.values[:, :start]
            self.keys, self.values = keys, values
            self.grow_count += 1
        self.used = start + count
        return start

    def extend(self, seq: CacheSeq, count: int, rope_advance: int) -> tuple[CacheSeq, int]:
        """Allocate ``count`` slots after ``seq``; returns the extended context and the first slot."""
        start = self.allocate(count)
        return seq.with_range(start, count, rope_advance), start

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[n, Hkv, D]`` (after RoPE) at slots ``start..start+n``."""
        n = keys.shape[0]
        self.keys[layer, start:start + n] = keys
        self.values[layer, start:start + n] = values

    def write_rows(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[n, Hkv, D]`` at the slots ``slots`` ``[n]`` (any order)."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

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
