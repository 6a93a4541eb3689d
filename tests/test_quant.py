"""NF4 / INT8 quantization on CPU (bitsandbytes >= 0.45 runs both there), plus the CUDA checks.

Stated tolerances (relative Frobenius error of a layer's output against the float layer, on
N(0,1) inputs and N(0, 1/256) weights): NF4 < 0.12 (measured 0.092 at 256×192), INT8 < 0.01
(measured 0.0097 at 256×192 — bitsandbytes' own Linear8bitLt gives the same 0.0097 on this layer;
the 0.004 of DEPENDENCIES.md is a 256×256 layer with nn.Linear's default init). A quantized
layer must equal the float layer run with its dequantized weight (INT8 also quantizes
activations to 8 bits; NF4 in eval mode on a CPU with AVX512-BF16 runs bitsandbytes' packed CPU
kernel, which multiplies in bfloat16: 0.3% per layer; both within 1%).

The model runs in bfloat16 on CUDA, so a bf16 forward must be silent (no warning, no log record
at WARNING or above: bitsandbytes' Linear8bitLt logs one per matmul) and INT8 must stay finite
for activations beyond float16's range. Warnings are recorded explicitly here, so these checks
do not depend on pyproject's filterwarnings.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

from bagel import quant  # noqa: E402
from bagel.config import ModelConfig  # noqa: E402
from bagel.errors import InputError  # noqa: E402
from bagel.kv_cache import EMPTY  # noqa: E402
from bagel.loading import load_checkpoint, paper_weight_bytes  # noqa: E402
from bagel.packing import PackBuilder  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _float_and_quantized(mode: str, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                         device: str = "cpu") -> tuple[nn.Linear, nn.Module]:
    """A float32 CPU linear [256 → 192] and its quantized copy on ``device`` computing in
    ``dtype`` (bias in ``dtype``), as a load builds it."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(256, 192)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(192, 256, generator=gen) / 16)
        lin.bias.copy_(torch.randn(192, generator=gen) * 0.05)
    q = quant.quantized_linear(mode, lin, dtype).eval()  # eval, as a loaded model is
    quant.assign_quantized_weight(q, lin.weight.detach().clone().to(dtype), torch.device(device), dtype)
    q.bias = nn.Parameter(lin.bias.detach().clone().to(device=device, dtype=dtype), requires_grad=False)
    return lin, q


def _dequantized_weight(q: nn.Module) -> torch.Tensor:
    """The float32 weight a quantized layer effectively multiplies by (call before its first
    forward: NF4 on an AVX512-BF16 CPU repacks its weight then)."""
    if isinstance(q, quant.Int8Linear):
        return quant.dequantize_int8(q.weight, q.weight_absmax)
    return quant.dequantize_nf4(q.weight.data, q.weight.quant_state).float()


def _run_silently(caplog, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` under inference mode; fail if it emits any warning (every category, every
    module, recorded explicitly) or any log record at WARNING or above."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            out = fn()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.WARNING] == []
    return out


@pytest.mark.parametrize(("mode", "tolerance"), [("nf4", 0.12), ("int8", 0.01)])
def test_quantized_linear_is_close_to_float(mode, tolerance):
    lin, q = _float_and_quantized(mode)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        err = _rel(q(x), lin(x))
    assert 0 < err < tolerance


def test_nf4_layer_equals_float_math_on_its_dequantized_weight():
    lin, q = _float_and_quantized("nf4")
    packed, state = quant.quantize_nf4(lin.weight.detach())
    deq = quant.dequantize_nf4(packed, state)
    assert deq.shape == lin.weight.shape
    assert _rel(deq, lin.weight.detach()) < 0.12
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert _rel(q(x), F.linear(x, deq, lin.bias)) < 0.01


def test_int8_quantize_round_trip_and_layer_agree():
    lin, q = _float_and_quantized("int8")
    codes, scales = quant.quantize_int8(lin.weight.detach())
    assert codes.dtype == torch.int8 and scales.shape == (192,)
    deq = quant.dequantize_int8(codes, scales)
    assert (deq - lin.weight.detach()).abs().max() <= scales.max() / 127 * 0.51 + 1e-3
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert _rel(q(x), F.linear(x, deq, lin.bias)) < 0.01


def test_swap_linears_replaces_only_what_the_predicate_names():
    with torch.device("meta"):
        root = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))
    swapped = quant.swap_linears(root, lambda name: name.startswith("1."), "nf4", torch.float32)
    assert swapped == ["1.0"]
    assert type(root[0]) is nn.Linear
    assert quant.is_quantized(root[1][0])
    assert quant.swap_linears(root, lambda name: True, "none", torch.float32) == []


def test_unknown_mode_and_missing_bitsandbytes_are_clear_errors(monkeypatch):
    with pytest.raises(InputError, match=r"quantization: 'int4' is not one of \('none', 'nf4', 'int8'\)"):
        quant.check_mode("int4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(InputError, match=r"quantization: 'nf4' needs the bitsandbytes package"):
        quant.bitsandbytes_module("nf4")


def _dequantized_twin(float_ckpt, quant_ckpt) -> nn.Module:
    """A float copy of the model whose quantized linears carry their dequantized weights: the
    reference path a quantized forward must reproduce."""
    twin = copy.deepcopy(float_ckpt.model)
    for name, module in quant_ckpt.model.named_modules():
        if quant.is_quantized(module):
            twin.get_submodule(name).weight.data.copy_(_dequantized_weight(module))
    return twin


@pytest.fixture(scope="module")
def loaded(golden_dir):
    ckpts = {mode: load_checkpoint(golden_dir, quantization=mode) for mode in quant.QUANT_MODES}
    twins = {mode: _dequantized_twin(ckpts["none"], ckpts[mode]) for mode in ("nf4", "int8")}
    return ckpts, twins


def test_weight_memory_shrinks_as_predicted(loaded):
    loaded, _ = loaded
    sizes = {mode: ckpt.weight_bytes for mode, ckpt in loaded.items()}
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]
    for mode, ckpt in loaded.items():
        paper = paper_weight_bytes(ckpt.config, dtype=torch.float32, quantization=mode)
        assert ckpt.weight_bytes == paper, mode
    quantized = [m for m in loaded["nf4"].model.modules() if quant.is_quantized(m)]
    assert len(quantized) == 2 * 2 * 7


def _decoder_outputs(model, tokenizer, ids: list[int], n_latent: int) -> torch.Tensor:
    """One packed forward through the decoder: a text segment (understanding expert) and a
    latent block (generation expert); returns the lm_head logits of the text rows and the
    velocities of the latent rows, flattened and concatenated (in the model's dtype)."""
    builder = PackBuilder(cache=None)
    builder.add_text(ids, EMPTY, write=False)
    builder.add_image_block("latent", n_latent, EMPTY, tokenizer.start_of_image_id,
                            tokenizer.end_of_image_id, write=False)
    batch = builder.build("cpu")
    hidden = model.language_model.lm_head.in_features
    x = torch.zeros(batch.length, hidden, dtype=model.dtype)
    x[batch.text_index] = model.language_model.embed(batch.text_ids)
    latents = torch.randn(n_latent, hidden, generator=torch.Generator().manual_seed(5))
    x[batch.row_index["latent"]] = latents.to(model.dtype)
    out = model.language_model(x, batch, None)
    logits = model.language_model.lm_head(out[batch.text_index])
    velocity = model.velocity(out[batch.row_index["latent"]])
    return torch.cat([logits.flatten(), velocity.flatten()])


# vs its dequantized twin: the same weights, so only the kernels' arithmetic differs (INT8 rounds
# activations to 8 bits; NF4's CPU kernel multiplies in bf16), amplified over two layers by the
# random tiny model's sharp attention (measured: nf4 0.019, int8 0.031). vs the float model: the
# quantization error itself, amplified the same way (measured: nf4 0.49, int8 0.061); the float
# bounds are sanity limits, not quality claims.
@pytest.mark.parametrize(("mode", "twin_tolerance", "float_tolerance"),
                         [("nf4", 0.05, 1.0), ("int8", 0.08, 0.2)])
def test_quantized_llm_forward_matches_its_dequantized_twin(loaded, mode, twin_tolerance, float_tolerance):
    ckpts, twins = loaded
    tokenizer = ckpts["none"].tokenizer
    ids = tokenizer.encode("A red circle on a blue square.")
    with torch.inference_mode():
        out = _decoder_outputs(ckpts[mode].model, tokenizer, ids, n_latent=6)
        twin = _decoder_outputs(twins[mode], tokenizer, ids, n_latent=6)
        full = _decoder_outputs(ckpts["none"].model, tokenizer, ids, n_latent=6)
    assert torch.isfinite(out).all()
    to_twin, to_float = _rel(out, twin), _rel(out, full)
    assert to_twin < twin_tolerance
    assert 0 < to_float < float_tolerance


# bf16 is what the model runs in on CUDA. Tolerances against float32 math on the dequantized
# weight: INT8's 8-bit activations plus bf16 output rounding (measured 0.0075), NF4's bf16
# arithmetic (measured 0.0031).
@pytest.mark.parametrize(("mode", "tolerance"), [("int8", 0.02), ("nf4", 0.02)])
def test_bf16_forward_of_a_quantized_linear_is_silent(caplog, mode, tolerance):
    lin, q = _float_and_quantized(mode, dtype=torch.bfloat16)
    reference_weight = _dequantized_weight(q)
    x = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = _run_silently(caplog, lambda: q(x))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 192)
    assert _rel(out.float(), F.linear(x.float(), reference_weight, lin.bias.detach())) < tolerance


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bf16_forward_of_a_quantized_model_is_silent(golden_dir, caplog, mode):
    ckpt = load_checkpoint(golden_dir, dtype=torch.bfloat16, quantization=mode)
    tokenizer = ckpt.tokenizer
    ids = tokenizer.encode("A red circle on a blue square.")
    out = _run_silently(caplog, lambda: _decoder_outputs(ckpt.model, tokenizer, ids, n_latent=6))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


def test_int8_bf16_rows_beyond_the_fp16_range_stay_finite_and_accurate():
    """bitsandbytes' Linear8bitLt casts activations to fp16 (max 65504): such rows come out
    non-finite there. Int8Linear scales each row in float32, so they are as accurate as any
    (measured 0.006–0.008 per row)."""
    lin, q = _float_and_quantized("int8", dtype=torch.bfloat16)
    reference_weight = _dequantized_weight(q)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(6))
    x[[0, 3]] *= 1e5
    x = x.to(torch.bfloat16)
    assert x.float().abs().max() > torch.finfo(torch.float16).max
    with torch.inference_mode():
        out = q(x).float()
    reference = F.linear(x.float(), reference_weight, lin.bias.detach())
    assert reference.abs().max() > torch.finfo(torch.float16).max  # the output side too
    assert torch.isfinite(out).all()
    for row in range(8):  # each row on its own: the large rows must not swamp the small ones
        assert _rel(out[row], reference[row]) < 0.02, row


def test_int8_zero_and_empty_inputs():
    lin, q = _float_and_quantized("int8", dtype=torch.bfloat16)
    with torch.inference_mode():
        zeros = q(torch.zeros(3, 256, dtype=torch.bfloat16))
        empty = q(torch.zeros(0, 256, dtype=torch.bfloat16))
    assert torch.equal(zeros, q.bias.expand(3, -1))
    assert empty.shape == (0, 192) and empty.dtype == torch.bfloat16


def test_int8_rows_in_blocks_equal_each_row_alone():
    """Activations are quantized per row, in blocks of INT8_ROW_BLOCK rows: a call over more
    rows than one block gives each row what it gets alone."""
    _, q = _float_and_quantized("int8", dtype=torch.float32)
    torch.manual_seed(1)
    x = torch.randn(quant.INT8_ROW_BLOCK + 3, 256)
    with torch.inference_mode():
        together = q(x)
        for row in (0, quant.INT8_ROW_BLOCK - 1, quant.INT8_ROW_BLOCK, quant.INT8_ROW_BLOCK + 2):
            assert torch.allclose(together[row], q(x[row:row + 1])[0], atol=1e-6)


def test_int8_layer_too_wide_for_its_int32_accumulator_is_refused():
    too_wide = quant.INT8_MAX_IN_FEATURES + 1
    with pytest.raises(InputError, match=rf"quantization: 'int8' layer in_features {too_wide} exceeds "
                                         rf"{quant.INT8_MAX_IN_FEATURES}, past which its int32 accumulator"):
        quant.Int8Linear(too_wide, 4, device="meta")


def test_quantization_none_means_none(golden_dir, loaded):
    ckpts, _ = loaded
    assert quant.check_mode(None) == "none"
    with torch.device("meta"):
        root = nn.Sequential(nn.Linear(8, 8))
    assert quant.swap_linears(root, lambda name: True, None, torch.float32) == []
    ckpt = load_checkpoint(golden_dir, quantization=None)
    assert ckpt.quantization == "none"
    assert not any(quant.is_quantized(m) for m in ckpt.model.modules())
    assert ckpt.weight_bytes == ckpts["none"].weight_bytes
    config = ModelConfig.from_folder(golden_dir)
    assert paper_weight_bytes(config, dtype=torch.float32, quantization=None) == ckpt.weight_bytes


# Rows 8 and 2048: NF4 takes bitsandbytes' fused bf16 kernel for few rows and its dequantize +
# F.linear fallback past 1536 rows; INT8 gets two rows beyond fp16's range.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [8, 2048])
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_cuda_bf16_forward_of_a_quantized_linear_is_silent_and_finite(caplog, mode, rows):
    lin, q = _float_and_quantized(mode, dtype=torch.bfloat16, device="cuda")
    reference_weight = _dequantized_weight(q)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(7))
    if mode == "int8":
        x[[0, 3]] *= 1e5
    x = x.to(device="cuda", dtype=torch.bfloat16)
    out = _run_silently(caplog, lambda: q(x))
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert torch.isfinite(out).all()
    reference = F.linear(x.float(), reference_weight, lin.bias.detach().cuda())
    assert _rel(out.float(), reference) < 0.02
