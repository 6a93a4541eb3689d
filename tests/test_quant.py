"""NF4 / INT8 quantization on CPU (bitsandbytes >= 0.45 runs both there).

Stated tolerances (relative Frobenius error of a layer's output against the float layer, on
N(0,1) inputs and N(0, 1/fan_in) weights): NF4 < 0.12 (measured 0.093 at 256×256), INT8 < 0.01
(measured 0.004). A quantized layer must equal the float layer run with its dequantized weight
(INT8 also quantizes activations to 8 bits; NF4 in eval mode on a CPU with AVX512-BF16 runs
bitsandbytes' packed CPU kernel, which multiplies in bfloat16: 0.3% per layer; both within 1%).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

from bagel import quant  # noqa: E402
from bagel.errors import InputError  # noqa: E402
from bagel.kv_cache import EMPTY  # noqa: E402
from bagel.loading import load_checkpoint, paper_weight_bytes  # noqa: E402
from bagel.packing import PackBuilder  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _float_and_quantized(mode: str, seed: int = 0) -> tuple[nn.Linear, nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(256, 192)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(192, 256, generator=gen) / 16)
        lin.bias.copy_(torch.randn(192, generator=gen) * 0.05)
    q = quant.quantized_linear(mode, lin, torch.float32).eval()  # eval, as a loaded model is
    quant.assign_quantized_weight(q, lin.weight.detach().clone(), torch.device("cpu"), torch.float32)
    q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return lin, q


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
        if not quant.is_quantized(module):
            continue
        if quant_ckpt.quantization == "nf4":
            weight = quant.dequantize_nf4(module.weight.data, module.weight.quant_state)
        else:
            weight = quant.dequantize_int8(module.weight.CB, module.weight.SCB)
        twin.get_submodule(name).weight.data.copy_(weight)
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
    velocities of the latent rows, flattened and concatenated."""
    builder = PackBuilder(cache=None)
    builder.add_text(ids, EMPTY, write=False)
    builder.add_image_block("latent", n_latent, EMPTY, tokenizer.start_of_image_id,
                            tokenizer.end_of_image_id, write=False)
    batch = builder.build("cpu")
    hidden = model.language_model.lm_head.in_features
    x = torch.zeros(batch.length, hidden)
    x[batch.text_index] = model.language_model.embed(batch.text_ids)
    x[batch.row_index["latent"]] = torch.randn(n_latent, hidden, generator=torch.Generator().manual_seed(5))
    out = model.language_model(x, batch, None)
    logits = model.language_model.lm_head(out[batch.text_index])
    velocity = model.velocity(out[batch.row_index["latent"]])
    return torch.cat([logits.flatten(), velocity.flatten()])


# vs its dequantized twin: the same weights, so only the kernels' arithmetic differs (INT8 rounds
# activations to 8 bits; NF4's CPU kernel multiplies in bf16), amplified over two layers by the
# random tiny model's sharp attention (measured: nf4 0.019, int8 0.036). vs the float model: the
# quantization error itself, amplified the same way (measured: nf4 0.49, int8 0.047); the float
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
