"""Analytic FLOP counts of LLM forwards, and the plain-GEMM yardstick they are compared with.

Owns: the number of floating-point operations one packed forward of the Qwen2 MoT decoder
performs — the projections and SwiGLU MLP of the expert each row is routed to, and attention
(``QKᵀ`` and ``PV``) over the keys each query row really sees — and the measured GFLOP/s of a
plain matrix multiply, the machine's practical limit for the same shapes. Used by
``bench.py``; knows nothing about requests or scenarios.

Counting conventions: one multiply-add is 2 FLOPs; biases, norms, RoPE, softmax and the
element-wise SiLU gate are left out (they are O(rows·C), against O(rows·C²) for the
linears); the LM head is counted only when asked (the denoising loop never calls it). Every
row goes through exactly one expert, so routing changes which weights are read, not the count.
"""

from __future__ import annotations

import time

import torch

from bagel.config import LLMConfig
from bagel.packing import PackedBatch


def linear_flops_per_row(cfg: LLMConfig) -> int:
    """FLOPs of the linear layers one row meets in the whole decoder stack (one expert)."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    q_width = cfg.num_attention_heads * cfg.head_dim
    kv_width = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * (c * q_width + 2 * c * kv_width + q_width * c + 3 * c * i)
    return per_layer * cfg.num_hidden_layers


def attended_pairs(query_len: int, past_len: int, is_causal: bool) -> int:
    """(query, key) pairs of one segment: every past key, plus its own rows — all of them
    for a bidirectional block, the lower triangle (diagonal included) for causal text."""
    own = query_len * (query_len + 1) // 2 if is_causal else query_len * query_len
    return query_len * past_len + own


def attention_flops(cfg: LLMConfig, pairs: int) -> int:
    """FLOPs of ``QKᵀ`` and ``PV`` for ``pairs`` (query, key) pairs in every layer and head."""
    return 4 * pairs * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers


def forward_flops(cfg: LLMConfig, batch: PackedBatch, *, with_lm_head: bool = False) -> int:
    """FLOPs of one packed decoder forward with layout ``batch`` (``llm.py``'s forward)."""
    total = batch.length * linear_flops_per_row(cfg)
    pairs = sum(attended_pairs(seg.query_len, seg.past.length, seg.is_causal) for seg in batch.segments)
    total += attention_flops(cfg, pairs)
    if with_lm_head:
        total += 2 * batch.length * cfg.hidden_size * cfg.vocab_size
    return total


def measure_gemm_gflops(rows: int, inner: int, cols: int, *, device: torch.device, dtype: torch.dtype,
                        min_seconds: float = 0.5, max_repeats: int = 200) -> float:
    """GFLOP/s of ``torch.mm`` ``[rows, inner] × [inner, cols]`` on ``device`` in ``dtype``:
    two untimed calls, then repeats until ``min_seconds`` have passed; the best of three such
    rounds (the machine's limit, not its average under other load)."""
    a = torch.randn(rows, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    out = torch.empty(rows, cols, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.mm(a, b, out=out)
    sync()
    best = 0.0
    for _ in range(3):
        repeats, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            repeats += 1
            if repeats >= max_repeats:
                break
            if repeats % 4 == 0:
                sync()  # one sync per few calls: enough to read a wall clock on CUDA
                if time.perf_counter() - started >= min_seconds:
                    break
        sync()
        seconds = time.perf_counter() - started
        best = max(best, 2.0 * rows * inner * cols * repeats / seconds / 1e9)
    return best
