"""A pure-PyTorch reference of the variable-length paged attention kernels' contract.

It takes exactly what ``torch.nn.attention.varlen.varlen_attn`` / ``flash_attn_varlen_func``
take on CUDA (``bagel.attention``'s kernel signature) and checks the constraints those kernels
impose — int32 metadata, ``cu_seq_k`` the running sum of ``seqused_k``, block tables that
cover every key, pages of a multiple of ``min_page`` slots — so that the CPU tests can feed it
the metadata the CUDA path builds and compare the outcome with SDPA. ``make_gather_reference``
is the same for the contiguous form (PyTorch 2.11's ``varlen_attn``: keys packed segment after
segment, no block tables).
"""

from __future__ import annotations

import math

import torch


def make_reference(min_page: int = 256):
    """A kernel with ``bagel.attention``'s signature; ``min_page``: the page-size multiple it
    demands (256 for the FlashAttention-2 paged kernels)."""

    def kernel(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, cu_seq_q: torch.Tensor,
               cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool, seqused_k: torch.Tensor,
               block_table: torch.Tensor) -> torch.Tensor:
        for name, t in (("cu_seq_q", cu_seq_q), ("cu_seq_k", cu_seq_k), ("seqused_k", seqused_k),
                        ("block_table", block_table)):
            assert t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}"
        pages, page, kv_heads, d = k_pages.shape
        assert page % min_page == 0, f"page size {page} is not a multiple of {min_page}"
        assert q.stride(-1) == 1 and q.shape[2] == d and q.shape[1] % kv_heads == 0
        cq, ck, used = cu_seq_q.tolist(), cu_seq_k.tolist(), seqused_k.tolist()
        n = len(used)
        assert len(cq) == len(ck) == n + 1 and cq[0] == ck[0] == 0 and cq[-1] == q.shape[0]
        assert all(ck[i + 1] - ck[i] == used[i] for i in range(n)), "cu_seq_k is the running sum of seqused_k"
        assert max_q == max(cq[i + 1] - cq[i] for i in range(n)) and max_k == max(used)
        assert block_table.shape[0] == n
        out = torch.empty_like(q)
        for i in range(n):
            n_pages = -(-used[i] // page)
            assert n_pages <= block_table.shape[1], "block table too narrow"
            ids = block_table[i, :n_pages].long()
            assert int(ids.max()) < pages, "block table names a page beyond the pool"
            keys = k_pages[ids].reshape(-1, kv_heads, d)[:used[i]]
            values = v_pages[ids].reshape(-1, kv_heads, d)[:used[i]]
            out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], keys, values, causal)
        return out

    return kernel


def make_gather_reference():
    """A kernel with the contiguous signature ``(q, keys, values, cu_seq_q, cu_seq_k, max_q,
    max_k, *, causal)``: keys/values ``[Tk, Hkv, D]`` packed segment after segment."""

    def kernel(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_seq_q: torch.Tensor,
               cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool) -> torch.Tensor:
        assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
        assert keys.shape == values.shape and keys.shape[2] == q.shape[2] and q.shape[1] % keys.shape[1] == 0
        cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
        n = len(cq) - 1
        assert len(ck) == n + 1 and cq[0] == ck[0] == 0 and cq[-1] == q.shape[0] and ck[-1] == keys.shape[0]
        assert max_q == max(cq[i + 1] - cq[i] for i in range(n)) and max_k == max(ck[i + 1] - ck[i] for i in range(n))
        out = torch.empty_like(q)
        for i in range(n):
            out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], keys[ck[i]:ck[i + 1]], values[ck[i]:ck[i + 1]], causal)
        return out

    return kernel


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool) -> torch.Tensor:
    """float32 attention of one segment; causal aligned bottom-right, as the flash kernels do."""
    groups = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, 1).float()
    v = values.repeat_interleave(groups, 1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) / math.sqrt(q.shape[2])
    if causal:
        rows, width = q.shape[0], k.shape[0]
        seen = torch.arange(width)[None, :] <= torch.arange(rows)[:, None] + (width - rows)
        scores = scores.masked_fill(~seen, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
