"""Random BAGEL checkpoints: written to disk in the real layout, or made straight on a device.

Owns: the size presets, their configs (as ``ModelConfig`` and as the JSON files the real
download has), the random initialisation (``RandomWeights``: two ``loading.TensorSource``s of
random tensors), ``make_tiny`` (a checkpoint folder: ``ema.safetensors`` / ``ae.safetensors``
streamed to disk through ``safetensors_writer``, plus the tokenizer files built by
``tiny_tokenizer.py``) and ``random_checkpoint`` (the same random tensors loaded onto a device
through ``loading.load_from_sources``, no disk; ``Engine.random`` calls it). The tensor names
and shapes are never listed here: they come from building ``BagelModel``/``AutoEncoder`` on
meta and mapping module keys to checkpoint keys through ``loading``'s name map, so a random
checkpoint always loads strictly.

Presets: ``tiny`` (the golden fixture's shapes, for tests), ``small`` (a few hundred MB, for
CPU benchmarks) and ``full``, BAGEL-7B-MoT's real shapes in bfloat16 (29.4 GB, 27.4 GiB: the
cost and memory of the real model without its weights, for GPU measurements). ``full`` takes
its numbers from the reference: the LLM is Qwen2.5-7B as BAGEL-7B-MoT's ``llm_config.json``
has it (hidden 3584, intermediate 18944, 28 layers, 28 attention heads, 4 KV heads, vocab
152064, rope_theta 1e6, max_position_embeddings 32768, RMS eps 1e-6), with the overrides of
the reference's ``app.py`` (qk_norm, untied embeddings, every layer MoT — ``LLMConfig``'s
defaults); the ViT is SigLIP so400m-patch14 as its ``vit_config.json`` stores it (hidden 1152,
intermediate 4304, 16 heads, patch 14, image_size 980, num_hidden_layers 27, of which ``app.py``
uses 26: ``ViTConfig.from_file`` subtracts one); the autoencoder is FLUX's (``VAEConfig``'s
defaults, the ``AutoEncoderParams`` of FLUX.1 that the reference's ``load_ae`` hard-codes). Its
tokenizer is our byte-level one like the others' (ids far below the real vocabulary; the rows
above it are there, zero, like padding); the real ``ae.safetensors`` is float32, ``full``
writes it in bfloat16 like everything else.

Initialisation, the same for every preset (chosen, like the golden fixture's, so a random
model gives varied, non-degenerate text and pictures; it is width-independent, since every
linear sees a normalised input, so the 7B model's outputs are finite and non-constant in bf16
too): linear and conv weights N(0, 1/fan_in); biases N(0, 0.05²); norm weights 1 + N(0, 0.1²)
except the per-head q/k norms 3 + N(0, 0.1²) (sharper attention); token embeddings
N(0, 0.3²); the ViT's learned position table N(0, 0.5²); the 2-D sin-cos tables computed
exactly (``pos_embed.sincos_table``); lm_head doubled, with the rows of non-printable byte
tokens and of the special tokens other than ``<|im_end|>`` damped ×0.3, the ``<|im_end|>`` row
×1.6 (so generation stops now and then) and padded rows zero. Everything is drawn from one
seeded generator on the target device, in the target dtype, ema before ae and each in sorted
key order, so a seed gives identical tensors on a given device: ``tiny``/``small`` files are
drawn on the CPU in float32 (so ``random_checkpoint(..., device="cpu", dtype=float32)`` holds
exactly the tensors of the folder ``make_tiny`` writes with that seed), ``full`` in bf16.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bagel.config import BAGEL_CONFIG_FILE, LLMConfig, ModelConfig, VAEConfig, ViTConfig
from bagel.errors import InputError
from bagel.loading import (AE_FILE, AE_NAME_MAP, EMA_FILE, EMA_NAME_MAP, LoadedCheckpoint, build_empty,
                           load_from_sources, parse_dtype, resolve_device, tensor_slots, to_checkpoint_key)
from bagel.pos_embed import PositionTable, sincos_table
from bagel.safetensors_writer import data_bytes, write_safetensors
from bagel.tiny_tokenizer import N_BYTE_SYMBOLS, SPECIAL_TOKENS, train_tokenizer, write_tokenizer
from bagel.tokenizer import EOS_TOKEN, Tokenizer

logger = logging.getLogger(__name__)

_QK_NORM = re.compile(r"(^|\.)[qk]_norm(_moe_gen)?$")
_VOCAB_MULTIPLE = 64  # vocab_size is padded like the real 151665 → 152064
_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TinySize:
    """Architecture numbers of one preset. ``vocab_size`` None: the tokenizer's size padded to
    a multiple of 64; ``file_dtype``: the dtype ``make_tiny`` writes the weights in."""

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
    vocab_size: int | None = None
    file_dtype: torch.dtype = torch.float32


SIZES = {
    # Same shapes as the golden fixture (../shared/fixtures/bagel-tiny).
    "tiny": TinySize(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vit_hidden=32,
                     vit_intermediate=64, vit_heads=2, vit_layers_used=2, ae_ch=32,
                     ae_ch_mult=(1, 1, 2, 2), ae_res_blocks=1, bpe_merges=224),
    # Qwen2-shaped (head_dim 64, GQA 2:1, SwiGLU ≈ 2.75×), FLUX-shaped autoencoder at half width.
    "small": TinySize(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4, vit_hidden=128,
                      vit_intermediate=512, vit_heads=2, vit_layers_used=3, ae_ch=64,
                      ae_ch_mult=(1, 2, 4, 4), ae_res_blocks=2, bpe_merges=744),
    # BAGEL-7B-MoT's real shapes (sources in the module docstring), in bf16 for GPU measurements.
    "full": TinySize(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vit_hidden=1152,
                     vit_intermediate=4304, vit_heads=16, vit_layers_used=26, ae_ch=128,
                     ae_ch_mult=(1, 2, 4, 4), ae_res_blocks=2, bpe_merges=744, vocab_size=152064,
                     file_dtype=torch.bfloat16),
}


def _preset(size: str) -> TinySize:
    if size not in SIZES:
        raise InputError(f"size: {size!r} is not one of {sorted(SIZES)}")
    return SIZES[size]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"seed: {seed!r} must be an integer in 0..2^63-1")


def preset_config(size: str, n_tokens: int) -> ModelConfig:
    """The architecture of preset ``size`` for a tokenizer of ``n_tokens`` tokens, with the
    reference's constants (``make_tiny``'s ``min_side_px`` lowers two of them in its folder).
    Equal to what ``ModelConfig.from_folder`` reads back from the JSON files ``make_tiny``
    writes (a test checks it)."""
    preset = _preset(size)
    vocab_size = preset.vocab_size or -(-n_tokens // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    assert n_tokens <= vocab_size, f"{size}: {n_tokens} tokens exceed vocab_size {vocab_size}"
    return ModelConfig(
        llm=LLMConfig(hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                      num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                      num_key_value_heads=preset.kv_heads, vocab_size=vocab_size),
        vit=ViTConfig(hidden_size=preset.vit_hidden, intermediate_size=preset.vit_intermediate,
                      num_hidden_layers=preset.vit_layers_used, num_attention_heads=preset.vit_heads),
        vae=VAEConfig(ch=preset.ae_ch, ch_mult=preset.ae_ch_mult, num_res_blocks=preset.ae_res_blocks),
    )


def _llm_json(llm: LLMConfig, eos_id: int, pad_id: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": llm.vocab_size,
    }


def _vit_json(vit: ViTConfig) -> dict:
    return {
        "architectures": ["SiglipVisionModel"],
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": vit.hidden_size,
        "image_size": vit.image_size,
        "intermediate_size": vit.intermediate_size,
        "layer_norm_eps": vit.layer_norm_eps,
        "model_type": "siglip_vision_model",
        "num_attention_heads": vit.num_attention_heads,
        "num_channels": vit.num_channels,
        "num_hidden_layers": vit.num_hidden_layers + 1,  # stored N+1: BAGEL drops the last layer
        "patch_size": vit.patch_size,
        "torch_dtype": "float32",
    }


def _ae_json(vae: VAEConfig) -> dict:
    return {**asdict(vae), "ch_mult": list(vae.ch_mult)}


@dataclass(frozen=True)
class _Draw:
    """How one checkpoint tensor is made (see the module docstring)."""

    key: str
    shape: tuple[int, ...]
    std: float = 0.0
    mean: float = 0.0
    sincos_side: int = 0  # > 0: the exact sin-cos table of that many positions per side
    is_lm_head: bool = False


def _draw(key: str, module_name: str, module: nn.Module, leaf: str, shape: tuple[int, ...]) -> _Draw:
    """The recipe of one parameter slot, by the kind of module that owns it."""
    if isinstance(module, PositionTable):
        return _Draw(key, shape, sincos_side=module.max_side)
    if leaf == "bias":
        return _Draw(key, shape, std=0.05)
    if isinstance(module, nn.Embedding):
        return _Draw(key, shape, std=0.5 if "position" in module_name else 0.3)
    if len(shape) == 1:  # the scale of a LayerNorm / GroupNorm / RMSNorm
        return _Draw(key, shape, std=0.1, mean=3.0 if _QK_NORM.search(module_name) else 1.0)
    is_lm_head = module_name.rpartition(".")[2] == "lm_head" and leaf == "weight"
    return _Draw(key, shape, std=math.prod(shape[1:]) ** -0.5, is_lm_head=is_lm_head)


def _draws(root: nn.Module, name_map: tuple[tuple[str, str], ...]) -> list[_Draw]:
    names = {id(m): n for n, m in root.named_modules()}
    draws = []
    for key, module, leaf, _ in sorted(tensor_slots(root), key=lambda slot: slot[0]):
        ckpt_key = to_checkpoint_key(key, name_map)
        assert ckpt_key is not None, f"{key} has no checkpoint name"
        draws.append(_draw(ckpt_key, names[id(module)], module, leaf, tuple(getattr(module, leaf).shape)))
    return draws


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


class RandomSource:
    """A ``loading.TensorSource`` of random tensors, made one at a time when asked for."""

    def __init__(self, location: str, draws: list[_Draw], weights: RandomWeights) -> None:
        self.location = location
        self._draws = draws
        self._weights = weights

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {d.key: d.shape for d in self._draws}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for d in self._draws:
            yield d.key, self._weights.make(d)


class RandomWeights:
    """The random tensors of one checkpoint of ``config``: ``ema`` and ``ae`` sources drawing
    from one generator seeded with ``seed`` on ``device``, each tensor made there in ``dtype``.
    The draws depend on the order the sources are consumed in: ema, then ae, as ``make_tiny``
    and ``load_from_sources`` do."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, *, seed: int, device: torch.device,
                 dtype: torch.dtype, label: str) -> None:
        self.device = device
        self.dtype = dtype
        self._tokenizer = tokenizer
        self._gen = torch.Generator(device=device).manual_seed(seed)
        model, vae = build_empty(config)
        self.ema = RandomSource(f"{label}: ema", _draws(model, EMA_NAME_MAP), self)
        self.ae = RandomSource(f"{label}: ae", _draws(vae, AE_NAME_MAP), self)

    def make(self, d: _Draw) -> torch.Tensor:
        """The next tensor of recipe ``d`` (advances the generator unless it is a sin-cos table)."""
        if d.sincos_side:
            return sincos_table(d.sincos_side, d.shape[1]).to(self.device, self.dtype)
        tensor = torch.randn(d.shape, generator=self._gen, device=self.device, dtype=self.dtype)
        tensor.mul_(d.std).add_(d.mean)
        if d.is_lm_head:
            _shape_lm_head(tensor, self._tokenizer)
        return tensor


def random_checkpoint(size: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
                      quantization: str = "none", seed: int = 0, offload: str = "none") -> LoadedCheckpoint:
    """A random checkpoint of preset ``size`` loaded onto ``device`` in ``dtype`` without touching
    disk: tokenizer and config built in memory, every tensor made on the device by
    ``RandomWeights`` and streamed in (quantized on arrival when asked, its decoder layers
    parked in host memory with ``offload="layers"``) by ``loading.load_from_sources``, the same
    code path as a checkpoint folder's load."""
    started = time.perf_counter()
    preset = _preset(size)
    _check_seed(seed)
    device = resolve_device(device)
    dtype = parse_dtype(dtype)
    tokenizer = Tokenizer(train_tokenizer(preset.bpe_merges), source=f"{size} tokenizer (in memory)")
    config = preset_config(size, len(tokenizer))
    label = f"random {size} checkpoint (seed {seed})"
    weights = RandomWeights(config, tokenizer, seed=seed, device=device, dtype=dtype, label=label)
    return load_from_sources(config, tokenizer, weights.ema, weights.ae, label=label, device=device,
                             dtype=dtype, quantization=quantization, offload=offload, started=started)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def make_tiny(folder: Path | str, *, seed: int = 0, size: str = "tiny",
              min_side_px: int | None = None) -> Path:
    """Write a random checkpoint of preset ``size`` into ``folder`` (created; it must not exist
    or be empty) and return the folder. The folder appears complete or not at all: everything
    is written into a temporary sibling that is renamed at the end. The weights are streamed:
    each tensor is made and written on its own, so memory stays near the largest tensor (1.1
    GB for ``full``). ``min_side_px`` writes a ``bagel_config.json`` lowering the VAE/ViT
    transforms' minimum short side (the reference's 512/224 px), so that edits of small
    pictures stay small on a CPU."""
    preset = _preset(size)
    _check_seed(seed)
    if min_side_px is not None and not 16 <= min_side_px <= 512:
        raise InputError(f"min_side_px: {min_side_px} must be in 16..512")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"folder: {folder} already exists and is not an empty directory")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        n_tokens = write_tokenizer(staging, preset.bpe_merges)
        tokenizer = Tokenizer.from_dir(staging)
        config = preset_config(size, n_tokens)
        pad_id = tokenizer.token_to_id(SPECIAL_TOKENS[0])
        _write_json(staging / "llm_config.json", _llm_json(config.llm, eos_id=tokenizer.eos_id, pad_id=pad_id))
        _write_json(staging / "vit_config.json", _vit_json(config.vit))
        _write_json(staging / "ae_config.json", _ae_json(config.vae))
        if min_side_px is not None:
            _write_json(staging / BAGEL_CONFIG_FILE, {"vae_min_px": min_side_px,
                                                      "vit_min_px": min(min_side_px, 224)})
        read_back = ModelConfig.from_folder(staging)
        assert replace(read_back, constants=config.constants) == config, "the JSON files disagree with the preset"
        weights = RandomWeights(read_back, tokenizer, seed=seed, device=torch.device("cpu"),
                                dtype=preset.file_dtype, label=f"random {size} checkpoint (seed {seed})")
        need = sum(data_bytes(s.shapes(), preset.file_dtype) for s in (weights.ema, weights.ae))
        free = shutil.disk_usage(staging).free
        if need > free:
            raise InputError(f"folder: {folder} has {free / 1e9:.1f} GB free, the {size} checkpoint needs "
                             f"{need / 1e9:.1f} GB")
        written = write_safetensors(staging / EMA_FILE, weights.ema, dtype=preset.file_dtype, metadata=_METADATA)
        written += write_safetensors(staging / AE_FILE, weights.ae, dtype=preset.file_dtype, metadata=_METADATA)
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("made a %s random checkpoint in %s (seed %d, %.2f GB of weight files)", size, folder, seed,
                written / 1e9)
    return folder
