"""BagelModel: the container of every BAGEL module whose weights live in ``ema.safetensors``.

Owns: the module tree whose ``state_dict()`` keys are exactly the checkpoint's keys —
``language_model`` (Qwen2 MoT decoder + LM head), ``vit_model`` (SigLIP NaViT), ``connector``,
``vit_pos_embed`` / ``latent_pos_embed`` (2-D sin-cos tables), ``time_embedder``, ``vae2llm`` and
``llm2vae`` — and the small pieces that turn ViT features and latents into LLM rows
(``embed_vit``, ``embed_latents``) and LLM rows back into velocities (``velocity``). Leaves the
flows (contexts, decoding, denoising) to the engine and weight loading to ``loading.py``. The
FLUX autoencoder is a separate module (``vae.py``, its own file in the checkpoint).

Constructible under ``with torch.device("meta")`` (no buffers, nothing computed at init).

Departures from the reference: none in the math. The timestep embedder builds its frequency
table per call in float32 (as the reference does) instead of holding it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bagel.config import ModelConfig
from bagel.llm import Qwen2MoTForCausalLM
from bagel.pos_embed import PositionTable
from bagel.vit import Connector, SiglipNaViT

TIMESTEP_FEATURES = 256


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[N, dim]`` of raw timesteps ``t`` ``[N]`` in [0, 1], ordered
    ``[cos, sin]`` (DiT convention, no ×1000 scaling), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Timestep → hidden: sinusoidal features, Linear–SiLU–Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class BagelModel(nn.Module):
    """Every BAGEL module of ``ema.safetensors`` under its checkpoint name."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.llm.hidden_size
        consts = cfg.constants
        self.latent_patch_size = consts.latent_patch_size
        self.latent_channels = cfg.vae.z_channels
        self.patch_latent_dim = consts.latent_patch_size ** 2 * cfg.vae.z_channels
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.vit_model = SiglipNaViT(cfg.vit)
        self.connector = Connector(cfg.vit.hidden_size, hidden, consts.connector_act)
        self.vit_pos_embed = PositionTable(consts.vit_max_num_patch_per_side, hidden)
        self.latent_pos_embed = PositionTable(consts.max_latent_size, hidden)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(self.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, self.patch_latent_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """ViT patches ``[N, P]`` of one or more pictures → LLM rows ``[N, C]``: SigLIP features
        through the connector, plus the sin-cos table at each patch's grid id."""
        feats = self.vit_model(patches, position_ids, cu_seqlens)
        rows = self.connector(feats.to(self.dtype)) + self.vit_pos_embed(position_ids)
        return rows.to(self.dtype)

    def embed_latents(self, packed: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Packed latent patches ``[N, p·p·z]`` at timestep(s) ``t`` (``[N]`` or ``[1]``) →
        LLM rows ``[N, C]``: ``vae2llm(x) + time_embedder(t) + latent_pos_embed(ids)``."""
        rows = self.vae2llm(packed.to(self.dtype)) + self.time_embedder(t) + self.latent_pos_embed(position_ids)
        return rows.to(self.dtype)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed LLM rows of latent tokens ``[N, C]`` → velocities ``[N, p·p·z]``."""
        return self.llm2vae(hidden)

    def latent_velocity(self, last_layer: torch.Tensor) -> torch.Tensor:
        """The last decoder layer's output for latent tokens ``[N, C]`` (any float dtype) →
        velocities ``[N, p·p·z]`` in float32: the generation expert's final norm, then
        ``llm2vae`` (latent rows always take the generation expert)."""
        normed = self.language_model.model.norm_moe_gen(last_layer.to(self.dtype))
        return self.llm2vae(normed).float()
