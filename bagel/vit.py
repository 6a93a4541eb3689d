"""The SigLIP vision encoder in BAGEL's NaViT form, and the MLP connector into the LLM width.

Owns: embedding flattened 14×14 patches (linear patch embedding + learned position table
indexed by 2-D grid id), the pre-norm transformer layers with attention restricted to each
picture of a packed sequence, the final LayerNorm, and the two-layer connector. Leaves patch
extraction and position ids to ``transforms.patchify_vit``, the fixed sin-cos table added after
the connector to ``pos_embed.PositionTable``, and weight loading to ``loading.py``.

Facts from the reference (``modeling/bagel/siglip_navit.py``, ``modeling/siglip/``,
``modeling/bagel/modeling_utils.py``): parameter names (``vision_model.embeddings.*``,
``vision_model.encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1/fc2}``,
``vision_model.post_layernorm``), the patch embedding stored as a Linear over a patch flattened
(row, column, channel), a learned table of (image_size/patch)² positions (no rotary embedding
in BAGEL), tanh-approximated GELU, LayerNorm eps from the config, softmax attention scaled by
1/sqrt(head_dim), and the connector fc1 (vision width → LLM width), activation, fc2.

Departures from the reference:
- Attention runs as one ``scaled_dot_product_attention`` call per picture instead of
  flash-attention's varlen kernel; both attend within each picture only.
- No hard-coded bfloat16 cast before attention: the module computes in its weights' dtype
  (the goldens were made with that cast turned into a float32 no-op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bagel.config import ViTConfig
from bagel.errors import CheckpointError

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"connector activation: {name!r} is not one of "
                              f"{sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class Embeddings(nn.Module):
    """Patches [N, P] + position ids [N] → token embeddings [N, C_vit]."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side ** 2, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class Attention(nn.Module):
    """Multi-head self-attention over a packed sequence, each picture attending to itself."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
        n = x.shape[0]

        def heads(proj: nn.Linear) -> torch.Tensor:  # [N, C] → [H, N, D]
            return proj(x).reshape(n, self.num_heads, self.head_dim).transpose(0, 1)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        out = torch.empty_like(q)
        for start, end in bounds:
            out[:, start:end] = F.scaled_dot_product_attention(
                q[None, :, start:end], k[None, :, start:end], v[None, :, start:end])[0]
        return self.out_proj(out.transpose(0, 1).reshape(n, -1))


class MLP(nn.Module):
    """fc1 → tanh-GELU → fc2."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bounds)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """Several pictures packed in one sequence → one feature row per patch.

    ``state_dict()`` keys are the checkpoint's ``vit_model.*`` keys without that prefix.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.post_layernorm.weight.dtype  # never quantized

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor,
                cu_seqlens: torch.Tensor) -> torch.Tensor:
        """patches [N, P], position_ids [N] int64, cu_seqlens [B+1] int32 → features [N, C_vit].

        Picture b owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``. The boundaries are read on the
        host once per call (one sync if ``cu_seqlens`` lives on the GPU; pass it on the CPU to
        avoid it).
        """
        edges = [int(e) for e in cu_seqlens.tolist()]
        assert edges[0] == 0 and edges[-1] == patches.shape[0] and edges == sorted(edges), (
            f"cu_seqlens {edges} must rise from 0 to the {patches.shape[0]} packed patches")
        bounds = [(s, e) for s, e in zip(edges[:-1], edges[1:]) if e > s]
        vm = self.vision_model
        x = vm.embeddings(patches.to(self.dtype), position_ids)
        for layer in vm.encoder.layers:
            x = layer(x, bounds)
        return vm.post_layernorm(x)


class Connector(nn.Module):
    """Two-layer MLP from the vision width to the LLM width (keys ``fc1.*``, ``fc2.*``)."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        self.act = _activation(act)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
