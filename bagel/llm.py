"""The Qwen2 mixture-of-transformers decoder BAGEL uses as its backbone.

Owns: RMS norms, rotary position embedding, the attention shared by both experts, the
understanding and generation projections, norms and MLPs (chosen per row by the packed
layout's ``gen_index``), the final norms and the LM head. Attention is packed and
variable-length: each segment of a ``PackedBatch`` attends to its cached context plus its own
rows (causal aligned bottom-right for text, full for image and latent blocks), computed by the
model's ``attention`` (``attention.py``). Leaves embedding of ViT and latent rows, cache
bookkeeping and sampling to the engine.

Parameter names follow the checkpoint (``model.layers.N.self_attn.q_proj_moe_gen`` ...), so
``state_dict()`` keys equal the ``language_model.*`` keys of ``ema.safetensors``. Linear layers
are only ever called as modules, so a loader may swap them for quantized ones.

Departures from the reference:
  * dtype-generic: the reference casts q/k/v and the generation-expert MLP inputs to bfloat16
    unconditionally; here activations keep the model's dtype (float32 gives the exact math the
    goldens were recorded with), and norm statistics and RoPE tables are computed in float32;
  * attention is packed over cache slots instead of the reference's merged key sequence, and
    its kernel is chosen by the engine (``attention.py``: SDPA on the CPU, variable-length
    flash kernels over a paged cache on CUDA);
  * RoPE is applied to queries and keys in one pass, without building the rotated copy;
  * the RoPE frequency table is computed on the fly (no buffer), so the module has exactly the
    checkpoint's parameters and can be built on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bagel.attention import Attention, SdpaAttention
from bagel.config import LLMConfig
from bagel.kv_cache import KVCache
from bagel.packing import PackedBatch


class RMSNorm(nn.Module):
    """Qwen2 RMS norm: statistics in float32, scale applied after casting back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused kernel computes x·rsqrt(mean(x²) + eps) in one pass (3× faster than the
        # op-by-op form on the per-head q/k norms of a denoising step, same float32 result)
        h = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[L, 1, D]`` for 1-D positions (Qwen2 default RoPE, computed in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` for ``x`` ``[L, heads, D]``, without building the rotated
    copy: first half ``x1·cos − x2·sin``, second half ``x2·cos + x1·sin`` (the tables repeat
    their first half, so either half of ``sin`` serves both)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    s = sin[..., :half]
    out = x * cos
    out[..., :half].addcmul_(x2, s, value=-1)
    out[..., half:].addcmul_(x1, s)
    return out


def routed(x: torch.Tensor, batch: PackedBatch, und: Callable[[torch.Tensor], torch.Tensor],
           gen: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``und`` to understanding rows and ``gen`` to generation rows of ``x`` ``[L, ...]``.
    With ``batch.gen_dense`` ``gen`` runs over every row and the few understanding rows are
    recomputed and written over (no gather/scatter of the generation rows)."""
    if batch.gen_index is None:
        return und(x)
    y_und = und(x.index_select(0, batch.und_index))
    if batch.gen_dense:
        return gen(x).to(y_und.dtype).index_copy_(0, batch.und_index, y_und)
    y_gen = gen(x.index_select(0, batch.gen_index))
    out = y_und.new_empty((x.shape[0], *y_und.shape[1:]))
    out.index_copy_(0, batch.und_index, y_und)
    out.index_copy_(0, batch.gen_index, y_gen.to(y_und.dtype))
    return out


# On the CPU the feed-forward runs over blocks of this many rows, so its [rows, intermediate]
# activations stay in cache (a denoising step of a try-on batch has thousands of rows; measured
# on the `small` shapes: 142 → 164 GFLOP/s). Rows are independent: the result is the same.
CPU_MLP_ROW_BLOCK = 1024


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # in place on fresh tensors: two fewer [rows, intermediate] buffers per call
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, block = x.shape[0], CPU_MLP_ROW_BLOCK
        if x.device.type != "cpu" or n <= 2 * block:
            return self._rows(x)
        first = self._rows(x[:block])
        out = first.new_empty((n, first.shape[1]))
        out[:block] = first
        for start in range(block, n, block):
            out[start:start + block] = self._rows(x[start:start + block])
        return out


class MoTAttention(nn.Module):
    """Grouped-query attention with a projection/qk-norm set per expert and one shared softmax."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        c, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(c, h * d, bias=True)
        self.k_proj = nn.Linear(c, kv * d, bias=True)
        self.v_proj = nn.Linear(c, kv * d, bias=True)
        self.o_proj = nn.Linear(h * d, c, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj_moe_gen = nn.Linear(c, h * d, bias=True)
        self.k_proj_moe_gen = nn.Linear(c, kv * d, bias=True)
        self.v_proj_moe_gen = nn.Linear(c, kv * d, bias=True)
        self.o_proj_moe_gen = nn.Linear(h * d, c, bias=False)
        self.q_norm_moe_gen = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm_moe_gen = RMSNorm(d, cfg.rms_norm_eps)

    def _qkv_und(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x, self.q_proj, self.k_proj, self.v_proj, self.q_norm, self.k_norm)

    def _qkv_gen(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x, self.q_proj_moe_gen, self.k_proj_moe_gen, self.v_proj_moe_gen,
                         self.q_norm_moe_gen, self.k_norm_moe_gen)

    def _qkv(self, x: torch.Tensor, qp: nn.Module, kp: nn.Module, vp: nn.Module, qn: nn.Module,
             kn: nn.Module) -> torch.Tensor:
        """Projected and qk-normed rows, concatenated per head: ``[n, H + 2·Hkv, D]``."""
        n = x.shape[0]
        q = qn(qp(x).view(n, self.num_heads, self.head_dim))
        k = kn(kp(x).view(n, self.num_kv_heads, self.head_dim))
        v = vp(x).view(n, self.num_kv_heads, self.head_dim)
        return torch.cat((q, k, v.to(q.dtype)), dim=1)

    def forward(self, x: torch.Tensor, batch: PackedBatch, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None, layer: int, attention: Attention) -> torch.Tensor:
        h, kv = self.num_heads, self.num_kv_heads
        qkv = routed(x, batch, self._qkv_und, self._qkv_gen)
        qk = apply_rope(qkv[:, :h + kv], *rope)  # queries and keys rotated together
        out = attention(qk[:, :h], qk[:, h:], qkv[:, h + kv:], batch, cache, layer)
        return routed(out, batch, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    """Pre-norm block: norm → shared attention → residual → norm → MLP → residual, with a norm
    and MLP per expert."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        c, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(c, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(c, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(c, eps)
        self.input_layernorm_moe_gen = RMSNorm(c, eps)
        self.post_attention_layernorm = RMSNorm(c, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(c, eps)

    def forward(self, x: torch.Tensor, batch: PackedBatch, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None, layer: int, attention: Attention) -> torch.Tensor:
        normed = routed(x, batch, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(normed, batch, rope, cache, layer, attention)
        mlp_out = routed(x, batch, lambda t: self.mlp(self.post_attention_layernorm(t)),
                         lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x + mlp_out


class Qwen2MoTModel(nn.Module):
    """Embedding table, decoder layers and the final norm of each expert."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention: Attention = SdpaAttention()  # the engine picks the kernel (attention.py)

    def forward(self, x: torch.Tensor, batch: PackedBatch, cache: KVCache | None, *,
                final_norm: bool = True) -> torch.Tensor:
        """Packed rows ``[L, C]`` → final-normed hidden states ``[L, C]`` (the last layer's
        output with ``final_norm=False``); writes new keys of segments with a ``write_start``
        into ``cache``."""
        rope = rope_tables(batch.positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, rope, cache, i, self.attention)
        return routed(x, batch, self.norm, self.norm_moe_gen) if final_norm else x


class Qwen2MoTForCausalLM(nn.Module):
    """Decoder plus the (untied) LM head; the checkpoint's ``language_model`` subtree."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, x: torch.Tensor, batch: PackedBatch, cache: KVCache | None, *,
                final_norm: bool = True) -> torch.Tensor:
        return self.model(x, batch, cache, final_norm=final_norm)
