"""Weight quantization: NF4 and INT8 linear layers backed by bitsandbytes.

Owns: the names of the quantization modes, the two quantized linear module types, the
functions that quantize (and dequantize, for tests and error estimates) one weight tensor, the
single function that swaps quantized modules in for ``nn.Linear`` by a name predicate, the
function that puts a full-precision weight into a quantized module (quantizing it on arrival),
and the byte count of a module tree as it sits in memory. Which linears get swapped is decided
by ``loading.py``; the model files never branch on the quantization mode.

Both modes follow what the reference app offers through accelerate/bitsandbytes:
``nf4`` is 4-bit NormalFloat with blocks of 64 weights and one absmax per block (no double
quantization, like the reference's ``bnb_4bit_use_double_quant=False``), computing in the load
dtype; ``int8`` is LLM.int8() row-wise absmax quantization without the outlier decomposition
(``threshold=0``), computing in the input's dtype. bitsandbytes >= 0.45 runs both on CPU too,
which is how the tests exercise this path (slower than float there: the gain is memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from bagel.errors import InputError

logger = logging.getLogger(__name__)

QUANT_MODES = ("none", "nf4", "int8")
NF4_BLOCKSIZE = 64


def check_mode(mode: str) -> str:
    """Return ``mode`` if it names a quantization mode, else raise ``InputError``."""
    if mode not in QUANT_MODES:
        raise InputError(f"quantization: {mode!r} is not one of {QUANT_MODES}")
    return mode


def bitsandbytes_module(mode: str) -> ModuleType:
    """Import bitsandbytes for ``mode``, or raise ``InputError`` saying how to get it."""
    try:
        import bitsandbytes
    except ImportError as exc:  # the optional extra is not installed
        raise InputError(
            f"quantization: {mode!r} needs the bitsandbytes package, which is not importable "
            f"({exc}); install it with `pip install 'bagel-jobs[quant]'` or use quantization='none'"
        ) from exc
    return bitsandbytes


def quantized_linear(mode: str, linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """An empty (meta) quantized module with the shape of ``linear``; weights arrive later
    through ``assign_quantized_weight``."""
    bnb = bitsandbytes_module(mode)
    has_bias = linear.bias is not None
    with torch.device("meta"):
        if mode == "nf4":
            return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                     compute_dtype=compute_dtype, compress_statistics=False,
                                     quant_type="nf4")
        if mode == "int8":
            return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                       has_fp16_weights=False, threshold=0.0)
    raise InputError(f"quantization: {mode!r} has no quantized linear (expected 'nf4' or 'int8')")


def swap_linears(root: nn.Module, should_quantize: Callable[[str], bool], mode: str,
                 compute_dtype: torch.dtype) -> list[str]:
    """Replace every ``nn.Linear`` under ``root`` whose qualified name satisfies
    ``should_quantize`` by an empty quantized module of the same shape. Returns the names swapped
    (in module order). ``mode`` "none" swaps nothing."""
    if check_mode(mode) == "none":
        return []
    targets = [name for name, module in root.named_modules()
               if type(module) is nn.Linear and should_quantize(name)]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, leaf, quantized_linear(mode, getattr(parent, leaf), compute_dtype))
    logger.info("quantization %s: %d linear layers swapped", mode, len(targets))
    return targets


def is_quantized(module: nn.Module) -> bool:
    """True for the bitsandbytes modules this file creates."""
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "Linear8bitLt")


def assign_quantized_weight(module: nn.Module, weight: torch.Tensor, device: torch.device,
                            compute_dtype: torch.dtype) -> None:
    """Quantize a full-precision ``weight`` [out, in] straight into ``module`` on ``device``.

    The float tensor exists only for the duration of this call: bitsandbytes quantizes it while
    moving it to ``device``, so a GPU only ever holds the packed form plus one float layer."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        param = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4",
                                  blocksize=NF4_BLOCKSIZE, compress_statistics=False, module=module)
        module.weight = param.to(device)
    elif isinstance(module, bnb.nn.Linear8bitLt):
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        module.weight = param.to(device)
    else:
        raise TypeError(f"{type(module).__name__} is not a quantized linear")


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, object]:
    """NF4-quantize a 2-D float weight: returns (packed uint8 [numel/2, 1], bitsandbytes
    QuantState holding the per-block absmax)."""
    bnb = bitsandbytes_module("nf4")
    return bnb.functional.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCKSIZE,
                                        compress_statistics=False, quant_type="nf4")


def dequantize_nf4(packed: torch.Tensor, state: object) -> torch.Tensor:
    """Inverse of ``quantize_nf4``: the float weight the NF4 layer effectively multiplies by."""
    bnb = bitsandbytes_module("nf4")
    return bnb.functional.dequantize_4bit(packed, state)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax INT8: returns (int8 codes [out, in], float32 row scales [out])."""
    bnb = bitsandbytes_module("int8")
    codes, row_absmax, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return codes, row_absmax


def dequantize_int8(codes: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_int8`` (float32)."""
    return codes.float() * (row_absmax.float().unsqueeze(1) / 127.0)


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a quantized module holds outside its parameters (scales, absmax)."""
    found: list[torch.Tensor] = []
    state = getattr(module.weight, "quant_state", None)
    if state is not None:
        found.extend(t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor))
    for holder in (module.weight, getattr(module, "state", None)):
        scb = getattr(holder, "SCB", None)
        if isinstance(scb, torch.Tensor):
            found.append(scb)
    return found


def memory_bytes(*roots: nn.Module) -> int:
    """Bytes held by the parameters, buffers and quantization statistics of ``roots``, each
    storage counted once (tied or shared tensors are not double counted)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.device.type == "meta":
            return
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for root in roots:
        for t in root.parameters():
            add(t)
        for t in root.buffers():
            add(t)
        for module in root.modules():
            if is_quantized(module):
                for t in _quant_state_tensors(module):
                    add(t)
    return total
