"""Check 2: the packed attention of a denoising step on the real shapes, with the SDPA math
kernel excluded, against a float32 reference.

Owns: building one layer's paged KV cache the way a try-on batch fills it — picture contexts
of several thousand keys prefilled in one forward, a few prompt forks of each sharing its
pages (a fork's partial last page moved), then one denoising forward with a query block of
``(side/16)² + 2`` rows over every fork and over one bare context — with ``PackBuilder`` and
running it through the engine's attention (``resolve_attention("auto", cuda, bf16)``: the
variable-length flash kernels) inside ``sdpa_kernel`` with only the flash, memory-efficient
and cuDNN backends allowed; the timing, the peak memory, and the comparison of a subset of
segments (prefill, a causal fork, three denoising blocks) with float32 attention computed
from each segment's logical keys (its context's rows and its own, never read back from the
pages, so a wrong block table, slot or page copy shows). Leaves the layouts to ``bagel``.

On the CPU the kernel is ``paged_reference_kernel`` — the kernels' contract in float32 —
behind the same ``VarlenAttention`` and layouts, so the dry run checks the bookkeeping; the
math exclusion needs CUDA. Tolerance: relative L2 error 2e-2 in bf16 (flash kernels round
the probabilities to bf16 before ``PV``: about 2^-8 relative, measured errors are ~4e-3),
1e-4 in float32.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from bagel.attention import VarlenAttention, resolve_attention
from bagel.flops import attended_pairs, attention_flops
from bagel.kv_cache import EMPTY, KVCache
from bagel.packing import PackBuilder, PackedBatch
from gpu_check.record import Record
from gpu_check.session import Session, allocated_bytes, dtype_name

TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
TIMED_CALLS = 5
REFERENCE_CHUNK_ROWS = 512


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool) -> torch.Tensor:
    """float32 attention of q ``[n, H, D]`` over keys/values ``[k, Hkv, D]`` → ``[n, H, D]``;
    causal aligned bottom-right, as the flash kernels do."""
    n, h, d = q.shape
    groups = h // keys.shape[1]
    k = keys.float().repeat_interleave(groups, 1)
    v = values.float().repeat_interleave(groups, 1)
    width = k.shape[0]
    out = []
    for start in range(0, n, REFERENCE_CHUNK_ROWS):
        qs = q[start:start + REFERENCE_CHUNK_ROWS].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) / math.sqrt(d)
        if causal:
            rows = torch.arange(start, start + qs.shape[0], device=q.device)[:, None]
            seen = torch.arange(width, device=q.device)[None, :] <= rows + (width - n)
            scores = scores.masked_fill(~seen, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(out)


def paged_reference_kernel(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, cu_seq_q: torch.Tensor,
                           cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool,
                           seqused_k: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The variable-length paged kernels' contract (``bagel.attention``) in float32: each
    segment's keys read through its block table."""
    page, kv_heads, d = k_pages.shape[1:]
    cq, used = cu_seq_q.tolist(), seqused_k.tolist()
    out = torch.empty_like(q)
    for i, n_keys in enumerate(used):
        ids = block_table[i, :-(-n_keys // page)].long()
        keys = k_pages[ids].reshape(-1, kv_heads, d)[:n_keys]
        values = v_pages[ids].reshape(-1, kv_heads, d)[:n_keys]
        out[cq[i]:cq[i + 1]] = reference_attention(q[cq[i]:cq[i + 1]], keys, values, causal).to(q.dtype)
    return out


def _math_excluded():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


class _Forward:
    """Random q/k/v for one packed forward, and the logical keys of each of its segments."""

    def __init__(self, batch: PackedBatch, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 gen: torch.Generator, device: torch.device) -> None:
        self.batch = batch
        n = batch.length
        self.q = torch.randn(n, heads, head_dim, generator=gen, device=device, dtype=dtype)
        self.k = torch.randn(n, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
        self.v = torch.randn(n, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
        self.out: torch.Tensor | None = None

    def rows(self, s: int) -> slice:
        seg = self.batch.segments[s]
        return slice(seg.query_start, seg.query_start + seg.query_len)

    def run(self, attention, cache: KVCache) -> torch.Tensor:
        n, h, d = self.q.shape
        self.out = attention(self.q, self.k, self.v, self.batch, cache, 0).view(n, h, d)
        return self.out


def _compare(fwd: _Forward, s: int, past_k: torch.Tensor, past_v: torch.Tensor) -> dict:
    rows = fwd.rows(s)
    seg = fwd.batch.segments[s]
    keys, values = torch.cat([past_k, fwd.k[rows]]), torch.cat([past_v, fwd.v[rows]])
    want = reference_attention(fwd.q[rows], keys, values, seg.is_causal and seg.query_len > 1)
    have = fwd.out[rows].float()
    diff = (have - want).abs()
    return {"segment": s, "rows": seg.query_len, "keys": keys.shape[0], "causal": seg.is_causal,
            "rel_l2": (diff.norm() / want.norm()).item(), "max_abs": diff.max().item()}


def check_attention(session: Session, rec: Record) -> None:
    llm, scale, device = session.config.llm, session.scale, session.device
    heads, kv_heads, head_dim = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    if session.is_cuda:
        dtype = torch.bfloat16
        attention = resolve_attention("auto", device, dtype)
        rec.expect("auto resolves to a variable-length flash kernel on CUDA in bf16",
                   isinstance(attention, VarlenAttention), f"got {attention.name!r}")
    else:
        dtype = torch.float32
        attention = VarlenAttention(paged_reference_kernel, name="reference (cpu)", page_size=scale.cpu_page_size)
    page = attention.page_size or 1
    q_rows = scale.attn_query_rows
    n_forks = sum(scale.attn_forks)
    capacity = sum(scale.attn_contexts) + n_forks * (64 + 2 * page) + (n_forks + 1) * (q_rows + 2 * page)
    cache = KVCache(1, kv_heads, head_dim, capacity, device, dtype, page_size=attention.page_size)
    gen = torch.Generator(device=device).manual_seed(0)

    def forward(builder: PackBuilder, **build) -> _Forward:
        return _Forward(builder.build(device, **build), heads, kv_heads, head_dim, dtype, gen, device)

    # 1. the picture contexts, prefilled in one forward (bidirectional blocks)
    builder = PackBuilder(cache)
    contexts = [builder.add_image_block("vit", n - 2, EMPTY, 0, 1)[0] for n in scale.attn_contexts]
    prefill = forward(builder)
    prefill.run(attention, cache)
    logical = [(prefill.k[prefill.rows(i)], prefill.v[prefill.rows(i)]) for i in range(len(contexts))]
    # 2. prompt forks sharing each context's pages (causal text, partial pages moved)
    builder = PackBuilder(cache)
    forks, parents = [], []
    for i, count in enumerate(scale.attn_forks):
        for _ in range(count):
            forks.append(builder.add_text(list(range(9 + 7 * len(forks) % 31)), contexts[i]))
            parents.append(i)
    fork_fwd = forward(builder)
    fork_fwd.run(attention, cache)
    fork_logical = [(torch.cat([logical[i][0], fork_fwd.k[fork_fwd.rows(j)]]),
                     torch.cat([logical[i][1], fork_fwd.v[fork_fwd.rows(j)]])) for j, i in enumerate(parents)]
    # 3. the denoising step: a query block over every fork and over the first bare context
    builder = PackBuilder(cache)
    targets = [*forks, contexts[0]]
    target_logical = [*fork_logical, logical[0]]
    for ctx in targets:
        builder.add_image_block("latent", q_rows - 2, ctx, 0, 1, write=False)
    step = forward(builder, scratch_start=cache.allocate(builder.scratch_slots()))
    guard = _math_excluded() if session.is_cuda else contextlib.nullcontext()
    with guard:
        step.run(attention, cache)  # also the warm-up
        if session.is_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        before = allocated_bytes(device)
        started = time.perf_counter()
        calls = TIMED_CALLS if session.is_cuda else 1
        for _ in range(calls):
            step.run(attention, cache)
        if session.is_cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - started) / calls
    if session.is_cuda:
        rec.expect("the denoising step runs with the SDPA math kernel excluded", True,
                   f"{attention.name} under sdpa_kernel([FLASH, EFFICIENT, CUDNN])")
        rec.figure(peak_extra_bytes=torch.cuda.max_memory_allocated(device) - before)
    else:
        rec.cuda_only("the denoising step runs with the SDPA math kernel excluded")
    pairs = sum(attended_pairs(seg.query_len, seg.past.length, False) for seg in step.batch.segments)
    flops = attention_flops(llm, pairs) / llm.num_hidden_layers  # one layer
    key_counts = [seg.past.length + seg.query_len for seg in step.batch.segments]
    last = len(targets) - 1
    compared = [("prefill", _compare(prefill, 0, prefill.k[:0], prefill.v[:0])),
                ("fork (causal)", _compare(fork_fwd, 0, *logical[parents[0]])),
                *((f"denoise block {s}", _compare(step, s, *target_logical[s])) for s in (0, last // 2, last))]
    tolerance = TOLERANCE[dtype]
    worst = max(c["rel_l2"] for _, c in compared)
    for what, c in compared:
        rec.expect(f"{what} matches float32 attention within rel L2 {tolerance:g}", c["rel_l2"] <= tolerance,
                   f"rel L2 {c['rel_l2']:.2e}, max |diff| {c['max_abs']:.2e} over {c['rows']} rows x {c['keys']} keys")
    rec.figure(kernel=attention.name, dtype=dtype_name(dtype), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
               page_size=attention.page_size, query_blocks=len(targets), query_rows=step.batch.length,
               keys_min=min(key_counts), keys_max=max(key_counts), page_copies=0 if step.batch.varlen is None
               or step.batch.varlen.copy_src is None else int(step.batch.varlen.copy_src.numel()),
               step_ms=seconds * 1e3, tflops=flops / seconds / 1e12, tolerance_rel_l2=tolerance,
               compared=[{"what": what, **c} for what, c in compared])
    rec.summary = (f"{attention.name}: {len(targets)} blocks x {q_rows} rows over {min(key_counts)}-"
                   f"{max(key_counts)} keys in {seconds * 1e3:.2f} ms ({flops / seconds / 1e12:.3g} TFLOP/s), "
                   f"worst rel L2 {worst:.1e}")
