"""Attention of the packed LLM forward: which kernel computes it, on which device.

Owns: the two ways a forward's attention runs and the choice between them.
  * ``SdpaAttention`` (the CPU path, and CUDA in float32): PyTorch's
    ``scaled_dot_product_attention``. A forward whose segments all have one length (a denoising
    step over many query blocks, a decode step over many streams) writes its keys to cache
    slots and runs one call per group of segments with similar key counts, keys gathered per
    segment and padding masked; other forwards (prefills) run one call per segment over cache
    views. Grouped-query heads are left to SDPA.
  * ``VarlenAttention`` (CUDA in bf16/fp16): variable-length flash kernels over the paged
    cache — no dense mask and no score matrix, GQA native, every segment of the forward in one
    call (two when a prefill mixes causal text with image blocks). The kernel is
    ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention inside PyTorch), or
    ``flash_attn.flash_attn_varlen_func`` when the optional ``flash-attn`` package is
    installed; both take the same metadata (``paged.py``). Pages are ``PAGE_SIZE`` slots, the
    smallest block the FlashAttention-2 paged kernels accept. PyTorch 2.13's ``varlen_attn``
    reads the pages through block tables; 2.11's takes contiguous keys only, so there each
    call first gathers its keys out of the pages (``VarlenCall.key_slots``: one copy of the
    call's keys per layer, a few percent of a step's time) — ``varlen-gather``.
A paged kernel is any callable ``kernel(q, k_pages, v_pages, cu_seq_q, cu_seq_k, max_q, max_k, *,
causal, seqused_k, block_table) -> out`` with q/out ``[Tq, H, D]`` and pages ``[P, page, Hkv, D]``
(causal: the mask aligned bottom-right, as flash kernels do); a gathering kernel is
``kernel(q, keys, values, cu_seq_q, cu_seq_k, max_q, max_k, *, causal)`` with keys/values
``[Tk, Hkv, D]`` packed segment after segment. A test can hand the exact metadata to a
reference implementation of either. Leaves the layouts to ``packing.py``/``paged.py`` and
the projections around attention to ``llm.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bagel.errors import InputError
from bagel.kv_cache import KVCache
from bagel.packing import PackedBatch, UniformAttention

logger = logging.getLogger(__name__)

PAGE_SIZE = 256
ATTENTION_MODES = ("auto", "sdpa", "varlen", "flash-attn")

VarlenKernel = Callable[..., torch.Tensor]


def causal_bottom_right(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask ``[q_len, k_len]``: query i sees key j iff j <= i + k_len - q_len."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


class SdpaAttention:
    """Attention through ``scaled_dot_product_attention`` over an unpaged cache."""

    page_size: int | None = None
    name = "sdpa"
    gathers_keys = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                 cache: KVCache | None, layer: int) -> torch.Tensor:
        """q ``[L, H, D]``, k/v ``[L, Hkv, D]`` of the forward's rows → ``[L, H·D]``."""
        if batch.uniform is not None and cache is not None:
            return self._uniform(q, k, v, batch.uniform, cache, layer)
        n, h, d = q.shape
        groups = h // k.shape[1]
        out = torch.empty_like(q)
        for seg in batch.segments:
            rows = slice(seg.query_start, seg.query_start + seg.query_len)
            k_new, v_new = k[rows], v[rows]
            if seg.past.length:
                assert cache is not None, "a segment with a past context needs the cache"
                k_past, v_past = cache.read(layer, seg.past)
                keys, values = torch.cat((k_past, k_new), 0), torch.cat((v_past, v_new), 0)
            else:
                keys, values = k_new, v_new
            if seg.write_start is not None:
                cache.write(layer, seg.write_start, k_new, v_new)
            mask = None
            if seg.is_causal and seg.query_len > 1:
                mask = causal_bottom_right(seg.query_len, keys.shape[0], q.device)
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                attn_mask=mask)
            out[rows] = o[0].transpose(0, 1)
        return out.reshape(n, h * d)

    @staticmethod
    def _uniform(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: UniformAttention, cache: KVCache,
                 layer: int) -> torch.Tensor:
        """One SDPA call per group of segments: keys written to their slots, gathered back per
        segment ``[S, Kmax, Hkv, D]`` (padding masked), grouped-query heads left to SDPA."""
        n, (_, h, d), kv = plan.query_len, q.shape, k.shape[1]
        cache.write_rows(layer, plan.write_slots, k, v)
        out = None if len(plan.groups) == 1 else q.new_empty(q.shape[0], h * d)
        for g in plan.groups:
            keys, values = cache.gather(layer, g.key_slots)
            rows = slice(g.first * n, (g.first + g.count) * n)
            o = F.scaled_dot_product_attention(
                q[rows].view(g.count, n, h, d).transpose(1, 2),
                keys.view(g.count, -1, kv, d).transpose(1, 2), values.view(g.count, -1, kv, d).transpose(1, 2),
                attn_mask=g.key_mask, enable_gqa=h != kv)
            o = o.transpose(1, 2).reshape(g.count * n, h * d)
            if out is None:
                return o
            out[rows] = o
        return out


@dataclass
class VarlenAttention:
    """Attention through a variable-length kernel over a paged cache (``paged.py`` layouts)."""

    kernel: VarlenKernel
    name: str = "varlen"
    page_size: int = PAGE_SIZE
    gathers_keys: bool = False  # the kernel takes contiguous keys (see the module docstring)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                 cache: KVCache | None, layer: int) -> torch.Tensor:
        lay = batch.varlen
        if lay is None or cache is None:
            raise ValueError("varlen attention needs a paged cache and the forward's varlen layout")
        n, h, d = q.shape
        if lay.copy_src is not None:
            cache.copy_rows(layer, lay.copy_src, lay.copy_dst)
        cache.write_rows(layer, lay.write_slots, k, v)
        k_pages, v_pages = (None, None) if self.gathers_keys else cache.pages(layer)
        out = None
        for call in lay.calls:
            q_call = (q if call.rows is None else q.index_select(0, call.rows)).contiguous()
            if self.gathers_keys:
                keys, values = cache.gather(layer, call.key_slots)
                o = self.kernel(q_call, keys, values, call.cu_seq_q, call.cu_seq_k, call.max_q, call.max_k,
                                causal=call.causal)
            else:
                o = self.kernel(q_call, k_pages, v_pages, call.cu_seq_q, call.cu_seq_k, call.max_q, call.max_k,
                                causal=call.causal, seqused_k=call.seqused_k, block_table=call.block_table)
            if call.rows is None:
                return o.reshape(n, h * d)
            if out is None:
                out = q.new_empty(q.shape)
            out.index_copy_(0, call.rows, o)
        return out.reshape(n, h * d)


def torch_varlen_kernel(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, cu_seq_q: torch.Tensor,
                        cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool,
                        seqused_k: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (FlashAttention kernels shipped in PyTorch)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k_pages, v_pages, cu_seq_q, cu_seq_k, max_q, max_k,
                       window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k_pages.shape[2],
                       seqused_k=seqused_k, block_table=block_table)


def torch_varlen_gather_kernel(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_seq_q: torch.Tensor,
                               cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool) -> torch.Tensor:
    """``varlen_attn`` of PyTorch 2.11 (contiguous keys; grouped-query heads taken as they are)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, keys, values, cu_seq_q, cu_seq_k, max_q, max_k,
                       window_size=(-1, 0) if causal else (-1, -1))


def flash_attn_kernel(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, cu_seq_q: torch.Tensor,
                      cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, causal: bool,
                      seqused_k: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """``flash_attn.flash_attn_varlen_func`` (the optional ``flash`` extra); it reads each
    sequence's key count from ``cu_seq_k`` (the cumulated ``seqused_k``)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k_pages, v_pages, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal,
                                  block_table=block_table)


# The keyword arguments of torch's varlen_attn this module passes: the paged-cache form of the API
# (PyTorch 2.13). PyTorch 2.11 has the contiguous form (``window_size``, no ``block_table``), used
# with gathered keys; other releases shipped other signatures (a FA3-only ``page_table`` cache
# form, an ``is_causal`` flag), which are not used.
TORCH_VARLEN_KWARGS = ("window_size", "enable_gqa", "seqused_k", "block_table")
TORCH_VARLEN_GATHER_KWARGS = ("window_size",)


def _takes(fn: Callable, names: tuple[str, ...]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in names)


def varlen_form(fn: Callable) -> str | None:
    """Which form of torch's ``varlen_attn`` ``fn`` is: ``"paged"`` (block tables, 2.13),
    ``"gather"`` (contiguous keys with ``window_size``, 2.11), or None (not usable)."""
    if _takes(fn, TORCH_VARLEN_KWARGS):
        return "paged"
    return "gather" if _takes(fn, TORCH_VARLEN_GATHER_KWARGS) else None


def torch_varlen_form() -> str | None:
    """The form of this torch's ``varlen_attn`` (``varlen_form``), None without one."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    return varlen_form(varlen_attn)


def has_torch_varlen() -> bool:
    """torch's ``varlen_attn`` exists in a form this module can call."""
    return torch_varlen_form() is not None


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


Attention = SdpaAttention | VarlenAttention


def resolve_attention(mode: str | Attention, device: torch.device, dtype: torch.dtype) -> Attention:
    """The attention for ``mode`` on ``device`` in ``dtype``. ``auto``: on CUDA in bf16/fp16 the
    ``flash-attn`` package when installed, else PyTorch's varlen kernel; SDPA otherwise (the
    CPU, or float32 anywhere: flash kernels take half precision only). An explicit mode that
    cannot run here is an ``InputError`` naming it; an ``Attention`` object is used as given."""
    if isinstance(mode, SdpaAttention | VarlenAttention):
        return mode
    if mode not in ATTENTION_MODES:
        raise InputError(f"attention: {mode!r} is not one of {ATTENTION_MODES}")
    half = dtype in (torch.bfloat16, torch.float16)
    if mode == "auto":
        if device.type != "cuda" or not half:
            return SdpaAttention()
        mode = "flash-attn" if has_flash_attn() else "varlen" if has_torch_varlen() else "sdpa"
        if mode == "sdpa":
            logger.warning("attention: no variable-length kernel here (torch %s, no flash-attn): "
                           "SDPA with dense masks instead", torch.__version__)
    if mode == "sdpa":
        return SdpaAttention()
    if device.type != "cuda" or not half:
        raise InputError(f"attention: {mode!r} runs FlashAttention kernels, which need a CUDA device and "
                         f"bfloat16 or float16 (got {device.type}, {str(dtype).removeprefix('torch.')})")
    if mode == "flash-attn":
        if not has_flash_attn():
            raise InputError("attention: 'flash-attn' needs the flash-attn package "
                             "(pip install 'bagel-jobs[flash]'); 'varlen' needs nothing extra")
        return VarlenAttention(flash_attn_kernel, name="flash-attn")
    form = torch_varlen_form()
    if form is None:
        raise InputError(f"attention: 'varlen' needs torch.nn.attention.varlen.varlen_attn taking "
                         f"{', '.join(TORCH_VARLEN_KWARGS)} (torch 2.13) or {', '.join(TORCH_VARLEN_GATHER_KWARGS)} "
                         f"(torch 2.11), this is torch {torch.__version__}; install the flash extra and use 'flash-attn'")
    if form == "gather":
        return VarlenAttention(torch_varlen_gather_kernel, name="varlen-gather", gathers_keys=True)
    return VarlenAttention(torch_varlen_kernel)
