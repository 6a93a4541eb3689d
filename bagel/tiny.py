"""The tiny-checkpoint maker: a random BAGEL model written in the real checkpoint layout.

Owns: the two size presets (``tiny``, like the golden fixture; ``small``, a few hundred MB for
benchmarks), the config JSON files in the forms the real download uses, the random
initialisation, and writing ``ema.safetensors`` / ``ae.safetensors`` plus the tokenizer files
(built by ``tiny_tokenizer.py``). The tensor names and shapes are never listed here: they come
from building ``BagelModel``/``AutoEncoder`` on meta and mapping module keys to checkpoint keys
through ``loading``'s name map, so a checkpoint made here always loads strictly.

Initialisation (chosen, like the golden fixture's, so a random model gives varied, non-degenerate
text and pictures): linear and conv weights N(0, 1/fan_in); biases N(0, 0.05²); norm weights
1 + N(0, 0.1²) except the per-head q/k norms 3 + N(0, 0.1²) (sharper attention); token
embeddings N(0, 0.3²); the ViT's learned position table N(0, 0.5²); the 2-D sin-cos tables
computed exactly (``pos_embed.sincos_table``); lm_head doubled, with the rows of non-printable
byte tokens and of the special tokens other than ``<|im_end|>`` damped ×0.3, the
``<|im_end|>`` row ×1.6 (so generation stops now and then) and padded rows zero. Everything is
drawn from one seeded generator in sorted key order, so a seed gives identical bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bagel.config import BAGEL_CONFIG_FILE, ModelConfig
from bagel.errors import InputError
from bagel.loading import AE_FILE, AE_NAME_MAP, EMA_FILE, EMA_NAME_MAP, build_empty, tensor_slots, to_checkpoint_key
from bagel.pos_embed import PositionTable, sincos_table
from bagel.tiny_tokenizer import N_BYTE_SYMBOLS, SPECIAL_TOKENS, write_tokenizer
from bagel.tokenizer import EOS_TOKEN, Tokenizer

logger = logging.getLogger(__name__)

_QK_NORM = re.compile(r"(^|\.)[qk]_norm(_moe_gen)?$")
_VOCAB_MULTIPLE = 64  # vocab_size is padded like the real 151665 → 152064


@dataclass(frozen=True)
class TinySize:
    """Architecture numbers of one preset."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vit_hidden: int
    vit_intermediate: int
    vit_heads: int
    vit_layers_used: int
    ae_ch: int
    ae_ch_mult: tuple[int, ...]
    ae_res_blocks: int
    bpe_merges: int


SIZES = {
    # Same shapes as the golden fixture (../shared/fixtures/bagel-tiny).
    "tiny": TinySize(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vit_hidden=32,
                     vit_intermediate=64, vit_heads=2, vit_layers_used=2, ae_ch=32,
                     ae_ch_mult=(1, 1, 2, 2), ae_res_blocks=1, bpe_merges=224),
    # Qwen2-shaped (head_dim 64, GQA 2:1, SwiGLU ≈ 2.75×), FLUX-shaped autoencoder at half width.
    "small": TinySize(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4, vit_hidden=128,
                      vit_intermediate=512, vit_heads=2, vit_layers_used=3, ae_ch=64,
                      ae_ch_mult=(1, 2, 4, 4), ae_res_blocks=2, bpe_merges=744),
}


def _llm_config(size: TinySize, vocab_size: int, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": size.hidden,
        "initializer_range": 0.02,
        "intermediate_size": size.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": size.heads,
        "num_hidden_layers": size.layers,
        "num_key_value_heads": size.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def _vit_config(size: TinySize) -> dict:
    return {
        "architectures": ["SiglipVisionModel"],
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": size.vit_hidden,
        "image_size": 980,
        "intermediate_size": size.vit_intermediate,
        "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model",
        "num_attention_heads": size.vit_heads,
        "num_channels": 3,
        "num_hidden_layers": size.vit_layers_used + 1,  # stored N+1: BAGEL drops the last layer
        "patch_size": 14,
        "torch_dtype": "float32",
    }


def _ae_config(size: TinySize) -> dict:
    return {
        "resolution": 256, "in_channels": 3, "downsample": 8, "ch": size.ae_ch, "out_ch": 3,
        "ch_mult": list(size.ae_ch_mult), "num_res_blocks": size.ae_res_blocks, "z_channels": 16,
        "scale_factor": 0.3611, "shift_factor": 0.1159,
    }


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


def _init_tensor(module_name: str, module: nn.Module, leaf: str, shape: tuple[int, ...],
                 gen: torch.Generator) -> torch.Tensor:
    """One random tensor for a parameter/buffer slot, by the kind of module that owns it."""
    if isinstance(module, PositionTable):
        return sincos_table(module.max_side, module.dim)
    if leaf == "bias":
        return _normal(shape, 0.05, gen)
    if isinstance(module, nn.Embedding):
        std = 0.5 if "position" in module_name else 0.3
        return _normal(shape, std, gen)
    if len(shape) == 1:  # the scale of a LayerNorm / GroupNorm / RMSNorm
        center = 3.0 if _QK_NORM.search(module_name) else 1.0
        return _normal(shape, 0.1, gen, mean=center)
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return _normal(shape, fan_in ** -0.5, gen)


def _shape_lm_head(weight: torch.Tensor, tokenizer: Tokenizer) -> None:
    """Gain and per-row scales of the output head (see the module docstring)."""
    weight.mul_(2.0)
    for tid in range(N_BYTE_SYMBOLS):
        text = tokenizer.decode([tid])
        if not (len(text) == 1 and 32 <= ord(text) <= 126):
            weight[tid].mul_(0.3)
    for token in SPECIAL_TOKENS:
        tid = tokenizer.token_to_id(token)
        weight[tid].mul_(1.6 if token == EOS_TOKEN else 0.3)
    weight[len(tokenizer):].zero_()


def _random_state(root: nn.Module, name_map: tuple[tuple[str, str], ...], gen: torch.Generator,
                  tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    slots = sorted(tensor_slots(root), key=lambda slot: slot[0])
    names = {id(m): n for n, m in root.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    for key, module, leaf, _ in slots:
        module_name = names[id(module)]
        shape = tuple(getattr(module, leaf).shape)
        tensor = _init_tensor(module_name, module, leaf, shape, gen)
        if module_name.rpartition(".")[2] == "lm_head" and leaf == "weight":
            _shape_lm_head(tensor, tokenizer)
        ckpt_key = to_checkpoint_key(key, name_map)
        assert ckpt_key is not None, f"{key} has no checkpoint name"
        tensors[ckpt_key] = tensor.contiguous()
    return tensors


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_tiny(folder: Path | str, *, seed: int = 0, size: str = "tiny",
              min_side_px: int | None = None) -> Path:
    """Write a random checkpoint of preset ``size`` into ``folder`` (created; it must not exist
    or be empty) and return the folder. The folder appears complete or not at all: everything
    is written into a temporary sibling that is renamed at the end. ``min_side_px`` writes a
    ``bagel_config.json`` lowering the VAE/ViT transforms' minimum short side (the reference's
    512/224 px), so that edits of small pictures stay small on a CPU."""
    if size not in SIZES:
        raise InputError(f"size: {size!r} is not one of {sorted(SIZES)}")
    if not 0 <= seed < 2**63:
        raise InputError(f"seed: {seed} must be in 0..2^63-1")
    if min_side_px is not None and not 16 <= min_side_px <= 512:
        raise InputError(f"min_side_px: {min_side_px} must be in 16..512")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"folder: {folder} already exists and is not an empty directory")
    preset = SIZES[size]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        n_tokens = write_tokenizer(staging, preset.bpe_merges)
        tokenizer = Tokenizer.from_dir(staging)
        vocab_size = -(-n_tokens // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
        _write_json(staging / "llm_config.json", _llm_config(
            preset, vocab_size, eos_id=tokenizer.eos_id, pad_id=tokenizer.token_to_id(SPECIAL_TOKENS[0])))
        _write_json(staging / "vit_config.json", _vit_config(preset))
        _write_json(staging / "ae_config.json", _ae_config(preset))
        if min_side_px is not None:
            _write_json(staging / BAGEL_CONFIG_FILE, {"vae_min_px": min_side_px,
                                                      "vit_min_px": min(min_side_px, 224)})
        config = ModelConfig.from_folder(staging)
        model, vae = build_empty(config)
        gen = torch.Generator().manual_seed(seed)
        metadata = {"format": "pt"}
        save_file(_random_state(model, EMA_NAME_MAP, gen, tokenizer), staging / EMA_FILE, metadata=metadata)
        save_file(_random_state(vae, AE_NAME_MAP, gen, tokenizer), staging / AE_FILE, metadata=metadata)
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("made a %s random checkpoint in %s (seed %d)", size, folder, seed)
    return folder
