"""Memory of the weights per load mode, working-memory estimate of an engine run, and the split
of a batch under a memory budget.

Owns: where the weights of a load live (``weight_placement``: device and host bytes for each
quantization and offload mode, from the configs alone); what one request adds to a run's
working memory — the KV-cache slots its contexts, decodes and quality-gate questions reserve,
the rows it puts into every packed denoising forward (one block per CFG branch) and the
activations those rows need, its latent buffers, the copy of a context it keeps — plus the
per-run fixed costs (the largest single VAE pass), and ``split_to_budget``, which cuts a batch
into consecutive sub-batches that each fit a budget. The working-memory budget does not count weights: it is for what a
run allocates on top of the loaded model. Leaves what a request is to ``engine.py``, its
counts (``Footprint``) to ``plans.py``, the weight sizes per tensor to ``loading.py``
(``paper_weight_bytes``) and the streaming of offloaded layers to ``offload.py``.

Weights (``weight_placement``, for a CUDA device): resident (``offload="none"``), all of them on
the device. With ``offload="layers"``: on the device everything but the decoder layers, plus two
layers' worth of buffers; on the host every decoder layer, each in one pinned block whose
tensors start on 512-byte boundaries and which PyTorch's pinned allocator rounds up to a power
of two (+2 % for BAGEL-7B-MoT's NF4 layers, +15 % for its bf16 and INT8 ones). While loading,
the device holds the resident weights and at most one layer (a layer leaves once its last
tensor has arrived): less than afterwards.

The model (bytes, ``e`` = bytes per element of the engine dtype):
  * KV cache: ``2 · layers · kv_heads · head_dim · e`` per slot, for the contexts, the decodes
    and the scratch slots of the denoising query blocks (their keys are parked in the cache
    for the batched attention call, see ``llm.py``);
  * one packed forward: per row, the transients of one decoder layer at its widest — the
    residual stream, the norm output, the routed copies, q/k/v with their RoPE temporaries,
    the attention output and the SwiGLU's gate, up, activation and product:
    ``(5·C + 3·(H + 2·Hkv)·D + 4·I) · e``; plus the attention's own transients. With SDPA
    (``attention.py``) every segment of a call counts: a denoising step attends all its query
    blocks — every request and CFG branch — in one call, each with float32 scores
    ``H · q · k · 4`` and its gathered keys and values ``2 · k · Hkv · D · e`` (the kernels may
    tile the scores, so this is an upper bound); a prefill (the quality gate's included)
    attends one segment at a time, so its widest segment counts. Variable-length flash
    kernels materialise no scores: only their float32 log-sum-exp, ``H · rows · 4`` (and,
    when the kernel gathers its keys out of the pages, one layer's copy of a call's keys and
    values ``2 · k · Hkv · D · e``);
  * a paged cache (the flash kernels') starts every allocation on a page and copies a fork's
    partial last page: up to one page of slots per allocation;
  * the quality gate (``gate.py``, after the pictures are decoded): its prefill rows — per
    gated request the input and result pictures' ViT blocks and the questions — are one more
    packed forward, and each question's first-token logits over the vocabulary ``V`` take
    ``3 · V · 4`` (the head's output, its float32 copy and the softmax), counted on top;
  * latents: per image, x and up to four velocity buffers in float32;
  * TaylorSeer (when a request asks for it): per CFG branch, up to ``order + 1`` float32 factors
    of the last decoder layer's output for its latent rows (``taylorseer.py``);
  * VAE: the largest decoder activation at full resolution times three (input, output and
    the skip of a ResNet block), for the largest picture of the batch, once (pictures are
    decoded one at a time);
  * saved contexts (``run(..., keep_contexts=True)``): each kept main context is a copy of its
    KV rows, ``2 · layers · kv_heads · head_dim · e`` per row, beside the cache. A context
    brought back from an earlier run needs no extra slots: its rows are the first rows of the
    main context the footprint counts already.
These are estimates, written to err on the high side; ``Engine.memory_estimate`` states
them per request so a deployment can size ``memory_budget_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bagel import offload as offloading
from bagel.config import ModelConfig
from bagel.errors import MemoryBudgetError
from bagel.loading import paper_layer_tensor_bytes, paper_weight_bytes


@dataclass(frozen=True)
class WeightPlacement:
    """Where a load's weights live (bytes)."""

    device_bytes: int
    host_bytes: int


def weight_placement(config: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, quantization: str = "none",
                     offload: str = "none") -> WeightPlacement:
    """Device and host bytes of the weights of a load of ``config`` on a CUDA device (see the
    module docstring); raises ``InputError`` for an unknown mode."""
    offload = offloading.check_mode(offload)
    total = paper_weight_bytes(config, dtype=dtype, quantization=quantization)
    if offload == "none":
        return WeightPlacement(total, 0)
    sizes = paper_layer_tensor_bytes(config, dtype=dtype, quantization=quantization)
    layer, n = sum(sizes), config.llm.num_hidden_layers
    block = offloading.pinned_allocation_bytes(sum(offloading.aligned(size) for size in sizes))
    return WeightPlacement(total - (n - offloading.RESIDENT_LAYERS) * layer, n * block)


@dataclass(frozen=True)
class Footprint:
    """What one request brings to a run (counts, not bytes)."""

    kv_tokens: int  # cache slots reserved for its contexts and decodes
    loop_rows: int  # rows per denoising forward, every CFG branch included (0: no picture out)
    widest_segment: tuple[int, int]  # (query rows, keys) of its largest prefill segment
    prefill_rows: int  # rows of its contexts' prefill forwards
    latent_elems: int  # elements of its output latent (0: no picture out)
    out_pixels: int  # output picture H·W (0: no picture out)
    in_pixels: int  # largest VAE-encoded input picture H·W (0: none)
    shared_kv: tuple[tuple[str, int], ...] = ()  # (key, slots) counted once per run per key
    loop_segments: tuple[tuple[int, int], ...] = ()  # (query rows, keys) of each block of a denoising step
    taylor_rows: int = 0  # TaylorSeer factor rows: (order + 1) × latent rows × CFG branches
    allocations: int = 0  # cache allocations (context items, decode, denoising scratch)
    gate_rows: int = 0  # rows of its quality-gate forwards (pictures, questions, answer tokens)
    gate_answers: int = 0  # quality-gate questions: one row of vocabulary logits each
    saved_rows: int = 0  # rows of the main context copied out for the caller (keep_contexts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak working memory of one run, by part (bytes)."""

    kv_cache: int
    forward: int
    latents: int
    vae: int
    attention: int = 0
    taylor_factors: int = 0
    saved_contexts: int = 0

    @property
    def total(self) -> int:
        return (self.kv_cache + self.forward + self.attention + self.latents + self.vae + self.taylor_factors
                + self.saved_contexts)

    def describe(self) -> str:
        mib = 2 ** 20
        return (f"{self.total / mib:.1f} MiB (KV cache {self.kv_cache / mib:.1f}, forward activations "
                f"{self.forward / mib:.1f}, attention {self.attention / mib:.1f}, latents {self.latents / mib:.1f}, "
                f"VAE {self.vae / mib:.1f}, TaylorSeer {self.taylor_factors / mib:.1f}, saved contexts "
                f"{self.saved_contexts / mib:.1f})")


class MemoryModel:
    """Turns footprints into bytes for one checkpoint, dtype and forward-size limit."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, max_rows_per_forward: int, *,
                 page_size: int | None = None, gathers_keys: bool = False) -> None:
        llm, vae = config.llm, config.vae
        e = torch.empty((), dtype=dtype).element_size()
        self.elem = e
        self.page_size = page_size
        self.gathers_keys = gathers_keys
        self.heads = llm.num_attention_heads
        self.hidden = llm.hidden_size
        self.kv_row_bytes = 2 * llm.num_key_value_heads * llm.head_dim * e  # one layer's key + value
        self.kv_bytes_per_token = 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * e
        qkv = (llm.num_attention_heads + 2 * llm.num_key_value_heads) * llm.head_dim
        self.row_bytes = (5 * llm.hidden_size + 3 * qkv + 4 * llm.intermediate_size) * e
        self.answer_bytes = 3 * llm.vocab_size * 4  # a gate answer's logits, float32 copy and softmax
        self.max_rows_per_forward = max_rows_per_forward
        mults = (1, *vae.ch_mult)
        # The widest full-resolution tensor: the upsampled output of the second level enters
        # level 0 at ch·ch_mult[1] channels (decoder); the encoder's is ch·ch_mult[0].
        self.vae_channels = vae.ch * max(mults[:3])

    def kv_slots(self, footprints: Sequence[Footprint]) -> int:
        """Cache slots of a run: every request's own, each shared picture once, and the scratch
        slots where a denoising forward parks its query blocks' keys (its widest layout)."""
        shared = dict(item for f in footprints for item in f.shared_kv)
        scratch = min(sum(f.loop_rows for f in footprints),
                      max(self.max_rows_per_forward, max((f.loop_rows for f in footprints), default=0)))
        pages = (self.page_size or 0) * sum(f.allocations for f in footprints)
        return sum(f.kv_tokens for f in footprints) + sum(shared.values()) + scratch + pages

    def attention_bytes(self, footprints: Sequence[Footprint], rows: int) -> int:
        """The attention's transients beyond the per-row activations (see the module docstring)."""
        if self.page_size is not None:  # flash kernels: only the log-sum-exp (and gathered keys)
            gathered = 0
            if self.gathers_keys:
                keys = max(sum(k for f in footprints for _, k in f.loop_segments),
                           max((f.widest_segment[1] for f in footprints), default=0))
                gathered = keys * self.kv_row_bytes
            return 4 * self.heads * rows + gathered
        call = sum(4 * self.heads * q * k + k * self.kv_row_bytes
                   for f in footprints for q, k in f.loop_segments)
        q, k = max((f.widest_segment for f in footprints), key=lambda s: s[0] * s[1], default=(0, 0))
        return max(call, 4 * self.heads * q * k + k * self.kv_row_bytes)

    def estimate(self, footprints: Sequence[Footprint]) -> MemoryEstimate:
        loop_rows = min(sum(f.loop_rows for f in footprints),
                        max(self.max_rows_per_forward, max((f.loop_rows for f in footprints), default=0)))
        kv = self.kv_bytes_per_token * self.kv_slots(footprints)
        rows = max(loop_rows, sum(f.prefill_rows for f in footprints), sum(f.gate_rows for f in footprints))
        forward = rows * self.row_bytes + self.answer_bytes * sum(f.gate_answers for f in footprints)
        latents = sum(5 * 4 * f.latent_elems for f in footprints)
        pixels = max((max(f.out_pixels, f.in_pixels) for f in footprints), default=0)
        vae = 3 * self.vae_channels * pixels * self.elem
        taylor = 4 * self.hidden * sum(f.taylor_rows for f in footprints)
        saved = self.kv_bytes_per_token * sum(f.saved_rows for f in footprints)
        return MemoryEstimate(kv, forward, latents, vae, self.attention_bytes(footprints, rows), taylor, saved)


def split_to_budget(items: Sequence, footprint_of: Callable, model: MemoryModel, budget: int,
                    name_of: Callable) -> list[list]:
    """Cut ``items`` (in order) into consecutive sub-batches whose estimate fits ``budget``
    bytes. Raises ``MemoryBudgetError`` naming the first item that does not fit on its own."""
    batches: list[list] = []
    current: list = []
    prints: list[Footprint] = []
    for item in items:
        fp = footprint_of(item)
        alone = model.estimate([fp])
        if alone.total > budget:
            raise MemoryBudgetError(f"{name_of(item)}: needs an estimated {alone.describe()}, over the "
                                    f"memory_budget_bytes limit of {budget / 2**20:.1f} MiB even on its own")
        if current and model.estimate([*prints, fp]).total > budget:
            batches.append(current)
            current, prints = [], []
        current.append(item)
        prints.append(fp)
    if current:
        batches.append(current)
    return batches
