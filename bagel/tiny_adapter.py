"""Random LoRA adapters written by PEFT itself, for tests and demos (``bagel make-adapter``).

Owns: turning target names given by a user into ``adapter_format.SUPPORTED_TARGETS`` entries,
and ``make_adapter``: our ``BagelModel`` for a checkpoint's config built on the meta device (it
has the reference's module names, so PEFT names the tensors as it would for the reference
model; no weight is read, so any checkpoint works, the 7B one too), wrapped by
``peft.get_peft_model`` with a ``LoraConfig`` whose ``target_modules`` is a regular expression
over the decoder layers, its LoRA weights filled with seeded random numbers, and saved with
PEFT's ``save_pretrained``: the files and their names are PEFT's, not ours. Leaves reading and
checking adapters to ``adapter_format.py`` and applying them to ``adapters.py``.

The weights: every ``lora_A`` ~ N(0, 1/in_features) and every ``lora_B`` ~ N(0, σ²) with
σ = 0.2 / (scale · √r), drawn from one generator seeded with ``seed``, module by module in
name order, A before B: whatever r and alpha, an adapted layer's output moves by about 20% of a
unit-variance output, a visible change that keeps the random model's outputs sane. With
``zero_b`` every B is zero (A is drawn the same): the adapter then changes nothing, as a freshly
initialised PEFT LoRA.

The peft package is a test/demo dependency (the ``test`` extra); without it ``make_adapter``
raises ``InputError`` saying how to install it.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from bagel.adapter_format import ATTENTION_TARGETS, LAYER_PREFIX, SUPPORTED_TARGETS
from bagel.config import ModelConfig
from bagel.errors import InputError
from bagel.loading import build_empty

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"  # PEFT's; save_pretrained writes this adapter's files into the folder itself


def resolve_targets(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The ``SUPPORTED_TARGETS`` named by ``names``, in their order there. A name selects the
    targets it equals or ends (after a dot), PEFT's rule for a list of ``target_modules``:
    "q_proj" is the understanding expert's query projection, "q_proj_moe_gen" the generation
    expert's, "gate_proj" both experts' and "mlp_moe_gen.gate_proj" the generation expert's."""
    chosen = set()
    for name in names:
        found = {t for t in SUPPORTED_TARGETS if t == name or t.endswith(f".{name}")}
        if not found:
            raise InputError(f"targets: {name!r} names no supported target (one of {', '.join(SUPPORTED_TARGETS)}, "
                             "or their last part)")
        chosen |= found
    return tuple(t for t in SUPPORTED_TARGETS if t in chosen)


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise InputError(f"make-adapter needs the peft package, which is not importable ({exc}); install it "
                         "with `pip install 'peft>=0.21'` (or the project's test extra)") from exc
    return peft


def make_adapter(checkpoint: str | Path, out: str | Path, *, rank: int = 4, alpha: float = 8.0,
                 targets: list[str] | tuple[str, ...] = ATTENTION_TARGETS, seed: int = 0,
                 zero_b: bool = False) -> Path:
    """Write a random LoRA adapter for the checkpoint folder ``checkpoint`` (only its JSON configs
    are read) into ``out`` (created; it must not exist or be empty) with PEFT's
    ``save_pretrained``, and return ``out``. ``targets``: see ``resolve_targets``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"rank: {rank!r} must be a positive integer")
    if not math.isfinite(alpha) or alpha == 0:
        raise InputError(f"alpha: {alpha!r} must be a finite, non-zero number")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"seed: {seed!r} must be an integer in 0..2^63-1")
    chosen = resolve_targets(targets)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"out: {out} already exists and is not an empty directory")
    config = ModelConfig.from_folder(checkpoint)
    peft = _peft()
    model, _ = build_empty(config)
    pattern = rf"{re.escape(LAYER_PREFIX)}\.\d+\.({'|'.join(map(re.escape, chosen))})"
    lora = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0, bias="none",
                           init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora, adapter_name=ADAPTER_NAME)
    scale = alpha / rank
    gen = torch.Generator().manual_seed(seed)
    adapted = sorted((name, module) for name, module in wrapped.named_modules()
                     if isinstance(module, peft.tuners.lora.LoraLayer))
    # PEFT made the LoRA weights on the meta device, like the base weights they sit beside.
    for _, module in adapted:
        a, b = module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]
        weight_a = torch.randn(a.weight.shape, generator=gen) / math.sqrt(a.in_features)
        weight_b = torch.randn(b.weight.shape, generator=gen) * (0.2 / (abs(scale) * math.sqrt(rank)))
        a.weight = nn.Parameter(weight_a, requires_grad=False)
        b.weight = nn.Parameter(torch.zeros_like(weight_b) if zero_b else weight_b, requires_grad=False)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    logger.info("wrote a rank-%d LoRA adapter on %d modules (seed %d%s) to %s", rank, len(adapted), seed,
                ", B = 0" if zero_b else "", out)
    return out
