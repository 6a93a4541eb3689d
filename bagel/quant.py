"""Weight quantization: NF4 and INT8 linear layers on bitsandbytes kernels.

Owns: the names of the quantization modes (and ``None`` meaning "none"), the two quantized
linear module types, the functions that quantize (and dequantize, for tests and error
estimates) one weight tensor, the single function that swaps quantized modules in for
``nn.Linear`` by a name predicate, the function that puts a full-precision weight into a
quantized module (quantizing it on arrival), and the byte count of a module tree as it sits in
memory. Which linears get swapped is decided by ``loading.py``; the model files never branch on
the quantization mode.

Both modes follow what the reference app offers through accelerate/bitsandbytes: ``nf4`` is
4-bit NormalFloat with blocks of 64 weights and one absmax per block (no double quantization,
like the reference's ``bnb_4bit_use_double_quant=False``); ``int8`` is LLM.int8() row-wise
absmax quantization of weights and activations without the outlier decomposition
(``threshold=0``). Both take and return activations in the load dtype (bfloat16 on CUDA,
float32 on CPU), and neither converts them to float16 on its own. bitsandbytes >= 0.45 runs
both on CPU too, which is how the tests exercise this path (slower than float there: the gain
is memory).

NF4 is bitsandbytes' ``Linear4bit`` with ``compute_dtype`` = the load dtype. Its CUDA
``gemm_4bit`` has bf16, fp16 and fp32 kernels (``cgemm_4bit_bf16`` …) and its dequantize +
``F.linear`` fallback runs in the input's dtype, so bf16 goes through untouched. Its per-call
messages: a WARNING when it has to choose a compute dtype for an fp16 input (never here: the
compute dtype is always given), and a UserWarning on CUDA calls of up to 1536 rows whose
``in_features`` is not a multiple of 64 (every BAGEL decoder linear is: 3584, 18944; the tiny
models: 64, 128).

INT8 is our ``Int8Linear``, not bitsandbytes' ``Linear8bitLt``. Read in bitsandbytes 0.50.2:
``Linear8bitLt.forward`` → ``bnb.matmul`` → ``MatMul8bitLt.forward`` (``autograd/_functions.py``)
logs "MatMul8bitLt: inputs will be cast from … to float16 during quantization" at WARNING on
every call whose input is not fp16 (~390 lines per BAGEL forward in bf16), then quantizes
``A.to(torch.float16)``: an activation above 65504 becomes inf, its row scale inf and the
row's codes garbage. The fp16 is in the kernels, not only in that wrapper: on CUDA
``bitsandbytes::int8_vectorwise_quant`` raises for any input but fp16, and
``bitsandbytes::int8_mm_dequant`` (``cdequant_mm_int32_fp16``) writes fp16 whatever dtype is
asked for and casts afterwards, so an output above 65504 overflows there too (its fused bias is
fp16-only as well). Only ``bitsandbytes::int8_linear_matmul`` (int8 × int8 → int32: cuBLASLt on
CUDA, ``torch._int_mm`` on CPUs with AVX-512, a float fallback otherwise) has no float dtype.
So ``Int8Linear`` holds the int8 codes and float32 row absmax of its weight, quantizes
activations row-wise in float32 (which, like bf16, holds any bf16 value), runs only the int8
GEMM in bitsandbytes, and dequantizes the int32 accumulator in float32 with one cast to the
input dtype. Nothing passes through fp16, so there is nothing to overflow; the int32
accumulator itself is exact while ``in_features`` ≤ ``INT8_MAX_IN_FEATURES`` (checked when the
layer is built). The price against bitsandbytes' fused fp16 kernels is a few extra elementwise
passes over the activation and the output, and float32 rather than fp16 transients for them
(not yet timed on a GPU).
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
INT8_MAX = 127
# Largest reduction length whose int32 sum of int8 × int8 products cannot overflow.
INT8_MAX_IN_FEATURES = (2**31 - 1) // (INT8_MAX * INT8_MAX)
INT8_ROW_BLOCK = 4096  # rows quantized and multiplied at a time (bounds the float32 transients)


def check_mode(mode: str | None) -> str:
    """The quantization mode ``mode`` names (``None`` means "none"), else raise ``InputError``.
    Callers use the returned value."""
    if mode is None:
        return "none"
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


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax INT8 over the last dimension, computed in float32: returns (int8 codes of
    ``t``'s shape, float32 absmax of each row). A weight [out, in] gives row scales [out]; an
    all-zero row gets absmax 0 and codes 0."""
    absmax = t.abs().amax(dim=-1).to(torch.float32)
    inverse = torch.where(absmax > 0, INT8_MAX / absmax, 0.0)
    # bf16/fp16 × float32 promotes to float32: the scaling and rounding never run in 16 bits.
    codes = (t * inverse.unsqueeze(-1)).round_().to(torch.int8)
    return codes, absmax


def dequantize_int8(codes: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_int8`` (float32)."""
    return codes.float() * (row_absmax.float().unsqueeze(-1) / INT8_MAX)


class Int8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` held as int8 codes plus one float32 absmax per output row.

    State: ``weight`` int8 [out, in] (the checkpoint's ``weight`` slot, filled by
    ``assign_quantized_weight``), ``weight_absmax`` float32 [out] (non-persistent: checkpoints
    hold float weights, and the scales are made from them on load), ``bias`` [out] in the load
    dtype or None. Forward: x [..., in] in any float dtype → [..., out] in x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features > INT8_MAX_IN_FEATURES:
            raise InputError(f"quantization: 'int8' layer in_features {in_features} exceeds "
                             f"{INT8_MAX_IN_FEATURES}, past which its int32 accumulator can overflow")
        bitsandbytes_module("int8")  # registers torch.ops.bitsandbytes, used by forward
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_absmax", torch.empty(out_features, dtype=torch.float32, device=device),
                             persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        out = x.new_empty(rows.shape[0], self.out_features)
        # Row blocks bound the float32 transients (a try-on step has ~100k rows: one pass over
        # an 18944-wide input would hold 7 GiB of float32 activations at once).
        for start in range(0, rows.shape[0], INT8_ROW_BLOCK):  # the CUDA GEMM rejects empty operands
            block = rows[start:start + INT8_ROW_BLOCK]
            codes, absmax = quantize_int8(block)
            # The op behind bitsandbytes.functional.int8_linear_matmul: [M, in] · [out, in]ᵀ → int32 [M, out].
            acc = torch.ops.bitsandbytes.int8_linear_matmul.default(codes, self.weight).to(torch.float32)
            acc.mul_(absmax.unsqueeze(1)).mul_(self.weight_absmax / (INT8_MAX * INT8_MAX))
            if self.bias is not None:
                acc.add_(self.bias)
            out[start:start + INT8_ROW_BLOCK] = acc
        return out.reshape(*lead, self.out_features)


def quantized_linear(mode: str | None, linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """An empty (meta) quantized module with the shape of ``linear``, computing in
    ``compute_dtype`` (NF4; INT8 computes in its input's dtype); weights arrive later through
    ``assign_quantized_weight``."""
    mode = check_mode(mode)
    has_bias = linear.bias is not None
    if mode == "nf4":
        bnb = bitsandbytes_module(mode)
        with torch.device("meta"):
            return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                     compute_dtype=compute_dtype, compress_statistics=False,
                                     quant_type="nf4")
    if mode == "int8":
        return Int8Linear(linear.in_features, linear.out_features, bias=has_bias, device="meta",
                          dtype=compute_dtype)
    raise InputError(f"quantization: {mode!r} has no quantized linear (expected 'nf4' or 'int8')")


def swap_linears(root: nn.Module, should_quantize: Callable[[str], bool], mode: str | None,
                 compute_dtype: torch.dtype) -> list[str]:
    """Replace every ``nn.Linear`` under ``root`` whose qualified name satisfies
    ``should_quantize`` by an empty quantized module of the same shape. Returns the names swapped
    (in module order). ``mode`` "none" (or None) swaps nothing."""
    mode = check_mode(mode)
    if mode == "none":
        return []
    targets = [name for name, module in root.named_modules()
               if type(module) is nn.Linear and should_quantize(name)]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, leaf, quantized_linear(mode, getattr(parent, leaf), compute_dtype))
    logger.info("quantization %s: %d linear layers swapped", mode, len(targets))
    return targets


def _is_nf4(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes") and cls.__name__ == "Linear4bit"


def is_quantized(module: nn.Module) -> bool:
    """True for the quantized linears this file creates (``Int8Linear`` and bitsandbytes'
    ``Linear4bit``)."""
    return isinstance(module, Int8Linear) or _is_nf4(module)


def assign_quantized_weight(module: nn.Module, weight: torch.Tensor, device: torch.device,
                            compute_dtype: torch.dtype) -> None:
    """Quantize a full-precision ``weight`` [out, in] straight into ``module`` on ``device``.

    The float tensor exists only for the duration of this call: it is quantized on ``device``,
    so a GPU only ever holds the packed form plus one float layer (and, for INT8, its float32
    scaled copy while rounding)."""
    if isinstance(module, Int8Linear):
        codes, absmax = quantize_int8(weight.to(device))
        module.weight = nn.Parameter(codes, requires_grad=False)
        module.weight_absmax = absmax
    elif _is_nf4(module):
        import bitsandbytes as bnb

        param = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4",
                                  blocksize=NF4_BLOCKSIZE, compress_statistics=False, module=module)
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


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors an NF4 module holds outside its parameters (per-block absmax, code table).
    ``Int8Linear`` keeps its scales in a buffer, which ``memory_bytes`` counts already."""
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return []
    return [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]


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
            if _is_nf4(module):
                for t in _quant_state_tensors(module):
                    add(t)
    return total
