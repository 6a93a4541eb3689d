"""A pure-PyTorch reference of the variable-length paged attention kernels' contract.

It takes exactly what ``torch.nn.attention.varlen.varlen_attn`` / ``flash_attn_varlen_func``
take on CUDA (``bagel.attention``'s kernel signature) and checks the constraints those kernels
impose — int32 metadata, ``cu_seq_k`` the running sum of ``seqused_k``, block tables that
cover every key, pages of a multiple of ``min_page`` slots — so that the CPU tests can feed it
the metadata the CUDA path builds and compare the outcome with SDPA.
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
        groups = q.shape[1] // kv_heads
        out = torch.empty_like(q)
        for i in range(n):
            n_pages = -(-used[i] // page)
            assert n_pages <= block_table.shape[1], "block table too narrow"
            ids = block_table[i, :n_pages].long()
            assert int(ids.max()) < pages, "block table names a page beyond the pool"
            keys = k_pages[ids].reshape(-1, kv_heads, d)[:used[i]].repeat_interleave(groups, 1).float()
            values = v_pages[ids].reshape(-1, kv_heads, d)[:used[i]].repeat_interleave(groups, 1).float()
            qi = q[cq[i]:cq[i + 1]].float()
            scores = torch.einsum("qhd,khd->hqk", qi, keys) / math.sqrt(d)
            if causal:  # bottom-right aligned, as the flash kernels do
                rows, width = qi.shape[0], keys.shape[0]
                seen = torch.arange(width)[None, :] <= torch.arange(rows)[:, None] + (width - rows)
                scores = scores.masked_fill(~seen, float("-inf"))
            out[cq[i]:cq[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
        return out

    return kernel
