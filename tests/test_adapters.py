"""LoRA adapters: PEFT's format checked without torch, applied unmerged on the real tiny engine
(float, NF4 and INT8 bases), the per-worker LRU, and ``bagel make-adapter``.

Every engine comparison runs one understand, one generate and one edit request together and
compares the understanding answer's decode logits and the two final latents (``run_traced``).

Stated tolerances, as ``max|out − ref| / max|ref|`` per tensor unless said otherwise:
  * float32 base + adapter vs the same base with ``W + scale·B·A`` merged by the test: < 1e-5
    (measured 2.6e-6 logits, 1.6e-6 generate latent, 4.5e-6 edit latent: the two sum the same
    products in another order, amplified over the random model's two layers and three steps);
  * B = 0, scale 0, and a run after the block: bit for bit equal to the base;
  * NF4 base + adapter vs a float model holding the NF4 weights dequantized plus the merged
    adapter, relative Frobenius error: < 0.1 (measured 0.010 logits, 0.024 generate, 0.060 edit;
    the NF4 base alone against its dequantized twin: 0.011, 0.020, 0.059 — the adapter adds
    nothing measurable to the NF4 kernel's bf16 arithmetic). INT8: < 0.12 (measured 0.040, 0.016,
    0.079; base alone 0.049, 0.033, 0.075). The adapter itself moves these outputs by 0.55–1.0,
    so an adapter left out fails either bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from bagel import quant
from bagel.adapter_format import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, SUPPORTED_TARGETS, adapter_targets,
                                  inspect_adapter, read_adapter_files)
from bagel.adapters import AdapterCache, apply_adapter, load_adapter
from bagel.cli import main
from bagel.config import GenerationParams, ModelConfig
from bagel.engine import Engine
from bagel.errors import AdapterError, InputError
from bagel.requests import Request
from tests.fixtures.adapters import make_test_adapter, merge_adapter

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "base_model.model."
Q0 = "language_model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def ckpt(service_model: Path) -> Path:
    """The session's tiny checkpoint (min side 64 px: an edit of a 64-px picture stays 64 px)."""
    return service_model


@pytest.fixture(scope="module")
def adapters(ckpt: Path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {"zero": make_test_adapter(ckpt, folder / "zero", seed=1, zero_b=True),
            "one": make_test_adapter(ckpt, folder / "one", seed=1),
            "two": make_test_adapter(ckpt, folder / "two", rank=2, alpha=4.0, seed=2,
                                     targets=("q_proj_moe_gen", "v_proj", "o_proj", "mlp_moe_gen.down_proj"))}


@pytest.fixture(scope="module")
def config(ckpt: Path) -> ModelConfig:
    return ModelConfig.from_folder(ckpt)


@pytest.fixture(scope="module")
def engine(ckpt: Path) -> Engine:
    return Engine.load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return [Request("understand", "What is this?", images=[picture], params=GenerationParams(seed=1, max_new_tokens=4)),
            Request("generate", "a red circle", width=32, height=32, params=GenerationParams(seed=2, num_timesteps=3)),
            Request("edit", "make it blue", images=[picture],
                    params=GenerationParams.for_task("edit", seed=3, num_timesteps=3))]


def outputs(engine: Engine, requests: list[Request]) -> dict[str, torch.Tensor]:
    """One run; by task: the answer's decode logits (and its token ids), the final latents (and
    the edit's picture)."""
    results, traces = engine.run_traced(requests, record=True)
    found = {}
    for request, result, trace in zip(requests, results, traces):
        if request.task == "understand":
            found.update(understand=trace["step_logits"], answer_ids=torch.tensor(trace["generated_ids"]))
        else:
            found[request.task] = trace["final_latent"]
            found[f"{request.task}_image"] = torch.from_numpy(np.asarray(result.image).copy())
    return found


@pytest.fixture(scope="module")
def base(engine: Engine, requests) -> dict[str, torch.Tensor]:
    return outputs(engine, requests)


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _frobenius_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _assert_identical(out: dict, ref: dict) -> None:
    for name in ref:
        assert torch.equal(out[name], ref[name]), name


def _merged_engine(ckpt: Path, adapter_dir: Path, scale: float = 1.0) -> Engine:
    merged = Engine.load(ckpt, device="cpu")
    merge_adapter(merged.model, adapter_dir, scale)
    return merged


# ---- the format, without torch ---------------------------------------------------------------

def test_a_peft_made_adapter_validates(adapters, config):
    info = inspect_adapter(*read_adapter_files(adapters["one"]), config)
    assert (info.rank, info.alpha, info.scale) == (4, 8.0, 2.0)
    assert info.target_modules == tuple(name for name, _, _ in adapter_targets(config))
    assert len(info.target_modules) == len(SUPPORTED_TARGETS) * config.llm.num_hidden_layers
    assert info.tensor_count == 2 * len(info.target_modules)
    assert info.parameter_count == sum(4 * (o + i) for _, o, i in adapter_targets(config))
    assert info.tensor_bytes == 4 * info.parameter_count  # PEFT saved float32
    two = inspect_adapter(*read_adapter_files(adapters["two"]), config)
    assert [m.rsplit(".", 2)[-2:] for m in two.target_modules[:4]] == [
        ["self_attn", "v_proj"], ["self_attn", "o_proj"], ["self_attn", "q_proj_moe_gen"], ["mlp_moe_gen", "down_proj"]]


def _rewritten(adapter_dir: Path, *, config: dict | None = None, tensors=None) -> tuple[bytes, bytes]:
    """The adapter's two files' bytes, the config updated with ``config`` and the tensor dict
    passed through ``tensors`` (a function)."""
    config_bytes, weights_bytes = read_adapter_files(adapter_dir)
    raw = {**json.loads(config_bytes), **(config or {})}
    weights = load_bytes(weights_bytes)
    if tensors is not None:
        weights = tensors(weights)
    return json.dumps(raw).encode(), save_bytes(weights)


def _renamed(old: str, new: str):
    return lambda w: {new if k == old else k: v for k, v in w.items()}


def _reshaped(key: str, shape: tuple[int, ...]):
    return lambda w: {**w, key: torch.zeros(shape)}


VIT_Q = "vit_model.vision_model.encoder.layers.0.self_attn.q_proj"
TENSOR_ERRORS = [
    (_renamed(f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{VIT_Q}.lora_A.weight"), VIT_Q,
     rf"module {VIT_Q} is not a supported target of this model \(supported: "
     r"language_model\.model\.layers\.\{0\.\.1\}"),
    (_renamed(f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{Q0.replace('.0.', '.2.')}.lora_A.weight"),
     Q0.replace(".0.", ".2."), "is not a supported target of this model"),
    (_reshaped(f"{PREFIX}{Q0}.lora_A.weight", (4, 63)), Q0,
     rf"{Q0}: lora_A\.weight has shape \[4, 63\], expected \[4, 64\] \(r × in_features\)"),
    (_reshaped(f"{PREFIX}{Q0}.lora_B.weight", (65, 4)), Q0,
     rf"{Q0}: lora_B\.weight has shape \[65, 4\], expected \[64, 4\] \(out_features × r\)"),
    (lambda w: {**w, f"{PREFIX}{Q0}.lora_A.weight": torch.zeros(8, 64),
                f"{PREFIX}{Q0}.lora_B.weight": torch.zeros(64, 8)},
     Q0, rf"{Q0}: rank mismatch: lora_A has 8 rows and lora_B 8 columns, adapter_config\.json says r = 4"),
    (lambda w: {k: v for k, v in w.items() if k != f"{PREFIX}{Q0}.lora_B.weight"}, Q0,
     rf"{Q0}: lora_B\.weight is missing \(lora_A\.weight is there\)"),
    (lambda w: {**w, f"{PREFIX}{Q0}.lora_magnitude_vector": torch.ones(64)}, None,
     r"lora_magnitude_vector is not a LoRA weight as PEFT names them"),
]


@pytest.mark.parametrize(("edit", "module", "message"), TENSOR_ERRORS,
                         ids=["other-model-part", "no-such-layer", "shape-a", "shape-b", "rank", "missing-b",
                              "dora-vector"])
def test_bad_tensors_are_refused_naming_the_module(adapters, config, edit, module, message):
    with pytest.raises(AdapterError, match=message) as caught:
        inspect_adapter(*_rewritten(adapters["one"], tensors=edit), config)
    assert caught.value.module == module
    assert caught.value.code == "invalid_adapter" and isinstance(caught.value, InputError)


CONFIG_ERRORS = [
    ({"peft_type": "LOHA"}, "peft_type", 'peft_type = "LOHA": only "LORA" adapters are supported'),
    ({"r": 0}, "r", "r = 0: the rank must be a positive integer"),
    ({"lora_alpha": "8"}, "lora_alpha", "must be a finite number"),
    ({"use_dora": True}, "use_dora", "use_dora = true: DoRA is not supported"),
    ({"bias": "lora_only"}, "bias", 'bias = "lora_only": trained biases are not supported'),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save",
     r"fully trained modules \(modules_to_save\) are not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern", "per-module ranks are not supported"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern", "per-module alphas are not supported"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out", "nn.Linear layers"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights", "rewrites the base weights"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens", "a LoRA variant that changes the forward pass"),
    ({"target_modules": 3}, "target_modules", "must be a string, a list of strings or null"),
]


@pytest.mark.parametrize(("change", "key", "message"), CONFIG_ERRORS, ids=[c[1] for c in CONFIG_ERRORS])
def test_unsupported_config_settings_are_refused_naming_the_key(adapters, config, change, key, message):
    with pytest.raises(AdapterError, match=message) as caught:
        inspect_adapter(*_rewritten(adapters["one"], config=change), config)
    assert caught.value.key == key and str(caught.value).startswith(f"{ADAPTER_CONFIG_FILE}: {key} = ")


def test_inert_and_unset_config_keys_are_accepted(adapters, config):
    change = {"use_rslora": True, "lora_dropout": 0.1, "task_type": "CAUSAL_LM", "some_future_flag": False,
              "layers_to_transform": [0, 1], "target_modules": ["q_proj", "gate_proj"], "init_lora_weights": "gaussian"}
    info = inspect_adapter(*_rewritten(adapters["one"], config=change), config)
    assert info.scale == 8.0 / 2.0  # rslora: alpha / √r
    assert info.config.target_modules == ("q_proj", "gate_proj")


def test_without_a_model_config_all_but_the_model_specific_checks_run(adapters, config):
    """An API host without the checkpoint: names, pairs, ranks and one shape per target are
    checked; the layer numbers and shapes wait for the check against the model's config."""
    files = read_adapter_files(adapters["one"])
    assert inspect_adapter(*files, None) == inspect_adapter(*files, config)
    q2 = Q0.replace(".0.", ".2.")
    third_layer = _rewritten(adapters["one"], tensors=lambda w: {**w, f"{PREFIX}{q2}.lora_A.weight": torch.zeros(4, 64),
                                                                  f"{PREFIX}{q2}.lora_B.weight": torch.zeros(64, 4)})
    assert inspect_adapter(*third_layer, None).target_modules[-1] == q2
    with pytest.raises(AdapterError, match=rf"{q2} is not a supported target of this model") as caught:
        load_adapter(third_layer, config)
    assert caught.value.module == q2
    other_shape = _rewritten(adapters["one"], tensors=lambda w: {**w, f"{PREFIX}{q2}.lora_A.weight": torch.zeros(4, 32),
                                                                  f"{PREFIX}{q2}.lora_B.weight": torch.zeros(64, 4)})
    with pytest.raises(AdapterError, match=rf"{q2}: adapts a 64×32 layer, {Q0} a 64×64 one"):
        inspect_adapter(*other_shape, None)
    vit = _rewritten(adapters["one"], tensors=TENSOR_ERRORS[0][0])
    with pytest.raises(AdapterError, match=rf"module {VIT_Q} is not a supported target \(supported: "
                                           r"language_model\.model\.layers\.N\."):
        inspect_adapter(*vit, None)
    rank = _rewritten(adapters["one"], tensors=TENSOR_ERRORS[4][0])
    with pytest.raises(AdapterError, match="rank mismatch"):
        inspect_adapter(*rank, None)


def test_malformed_files_are_refused(adapters, config):
    config_bytes, weights = read_adapter_files(adapters["one"])
    cases = [
        (config_bytes, weights[:7], "is too short for a safetensors file"),
        (config_bytes, weights[:-4], "the tensors cover .* bytes of data, the file holds"),
        (config_bytes, (10**9).to_bytes(8, "little") + weights[8:], "header length 1000000000 exceeds"),
        (config_bytes, save_bytes({f"{PREFIX}{Q0}.lora_A.weight": torch.zeros(4, 64, dtype=torch.int32)}),
         "dtype I32 is not one of F64, F32, F16, BF16"),
        (b"{not json", weights, "adapter_config.json: not valid JSON"),
        (b"[1]", weights, "a JSON object is required"),
        (config_bytes, save_bytes({}), "holds no tensors"),
    ]
    for config_part, weights_part, message in cases:
        with pytest.raises(AdapterError, match=message):
            inspect_adapter(config_part, weights_part, config)
    with pytest.raises(AdapterError, match=rf"nowhere/{ADAPTER_CONFIG_FILE}: cannot be read \(No such file"):
        read_adapter_files(adapters["one"] / "nowhere")


def test_the_format_module_loads_without_torch():
    script = ("import sys, bagel.adapter_format\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('safetensors')))")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# ---- applied on the float engine -------------------------------------------------------------

def test_an_adapter_with_b_zero_changes_nothing_bit_for_bit(engine, requests, base, adapters, config):
    zero = load_adapter(adapters["zero"], config)
    assert zero.nbytes == 4 * zero.info.parameter_count
    with apply_adapter(engine.model, zero):
        _assert_identical(outputs(engine, requests), base)


def test_an_adapter_equals_its_weights_merged_and_is_gone_after_the_block(engine, requests, base, adapters, config,
                                                                          ckpt):
    one = load_adapter(adapters["one"], config)
    with apply_adapter(engine.model, one):
        out = outputs(engine, requests)
    reference = outputs(_merged_engine(ckpt, adapters["one"]), requests)
    for task in ("understand", "generate", "edit"):
        assert _max_rel(out[task], reference[task]) < 1e-5, task
        assert _max_rel(out[task], base[task]) > 0.1, task  # and it does change the outputs
    assert torch.equal(out["answer_ids"], reference["answer_ids"])
    _assert_identical(outputs(engine, requests), base)  # the hooks are gone, the weights untouched


def test_two_adapters_differ_and_each_equals_its_own_merge(engine, requests, adapters, config, ckpt):
    """The second adapter (rank 2, four kinds of target) at half strength: ``scale`` weighs
    ``alpha / r``."""
    one = load_adapter(read_adapter_files(adapters["one"]), config)  # from the two files' bytes
    two = load_adapter(adapters["two"], config)
    with apply_adapter(engine.model, one):
        out_one = outputs(engine, requests)
    with apply_adapter(engine.model, two, scale=0.5):
        out_two = outputs(engine, requests)
    reference_two = outputs(_merged_engine(ckpt, adapters["two"], scale=0.5), requests)
    for task in ("understand", "generate", "edit"):
        assert _max_rel(out_two[task], reference_two[task]) < 1e-5, task
        assert _max_rel(out_two[task], out_one[task]) > 0.1, task


def test_scale_zero_is_the_base_and_bad_uses_are_refused(engine, requests, base, adapters, config):
    one = load_adapter(adapters["one"], config)
    with apply_adapter(engine.model, one, scale=0.0):
        _assert_identical(outputs(engine, requests), base)
    with pytest.raises(AdapterError, match=r"scale: nan must be a finite number"):
        with apply_adapter(engine.model, one, scale=float("nan")):
            pass
    bf16 = load_adapter(adapters["one"], config, dtype=torch.bfloat16)
    with pytest.raises(AdapterError, match=r"adapter: loaded on cpu as torch\.bfloat16, the model is on cpu as "
                                           r"torch\.float32"):
        with apply_adapter(engine.model, bf16):
            pass
    with pytest.raises(RuntimeError, match="inside the block"):
        with apply_adapter(engine.model, one):
            raise RuntimeError("inside the block")
    _assert_identical(outputs(engine, requests), base)  # the hooks went with the exception


def test_non_finite_adapter_numbers_are_refused_naming_the_module(adapters, config):
    key = f"{PREFIX}{Q0}.lora_B.weight"
    files = _rewritten(adapters["one"], tensors=lambda w: {**w, key: torch.full_like(w[key], float("inf"))})
    with pytest.raises(AdapterError, match=rf"{Q0}: {key} holds non-finite numbers") as caught:
        load_adapter(files, config)
    assert caught.value.module == Q0


# ---- the cache -------------------------------------------------------------------------------

def test_the_cache_evicts_the_least_recently_used_and_reloads_it(adapters, config):
    loads = []

    def loader(name: str):
        def load():
            loads.append(name)
            return load_adapter(adapters[name], config)
        return load

    size_one = load_adapter(adapters["one"], config).nbytes
    size_zero = size_one  # same rank and targets
    cache = AdapterCache(max_bytes=size_one + size_zero + 1)
    cache.get("one", loader("one"))
    cache.get("zero", loader("zero"))
    assert cache.get("one", loader("one")) is cache.get("one", loader("one"))  # hits: "one" is now most recent
    assert cache.keys() == ["zero", "one"] and (cache.hits, cache.misses, cache.evictions) == (2, 2, 0)
    cache.get("two", loader("two"))  # over the limit: "zero", the least recently used, goes
    assert cache.keys() == ["one", "two"] and cache.evictions == 1 and "zero" not in cache
    assert cache.nbytes <= cache.max_bytes
    cache.get("zero", loader("zero"))  # a miss again: reloaded, and "one" goes
    assert cache.keys() == ["two", "zero"] and loads == ["one", "zero", "two", "zero"]
    assert (cache.hits, cache.misses, cache.evictions) == (2, 4, 2)
    small = AdapterCache(max_bytes=size_one - 1)
    with pytest.raises(AdapterError, match=rf"adapter one: {size_one} bytes on the device exceeds the "
                                           rf"{size_one - 1} byte adapter cache limit"):
        small.get("one", loader("one"))
    assert len(small) == 0 and small.misses == 1
    with pytest.raises(AdapterError, match="max_bytes: 0 must be a positive number of bytes"):
        AdapterCache(0)


# ---- quantized bases -------------------------------------------------------------------------

def _dequantized_twin(ckpt: Path, quantized: Engine) -> Engine:
    """A float engine whose quantized linears carry the quantized engine's dequantized weights
    (built before the quantized engine's first forward: NF4 repacks its weight on an AVX512-BF16
    CPU then)."""
    twin = Engine.load(ckpt, device="cpu")
    for name, module in quantized.model.named_modules():
        if isinstance(module, quant.Int8Linear):
            weight = quant.dequantize_int8(module.weight, module.weight_absmax)
        elif quant.is_quantized(module):
            weight = quant.dequantize_nf4(module.weight.data, module.weight.quant_state).float()
        else:
            continue
        twin.model.get_submodule(name).weight = torch.nn.Parameter(weight, requires_grad=False)
    return twin


@pytest.mark.parametrize(("mode", "tolerance"), [("nf4", 0.1), ("int8", 0.12)])
def test_an_adapter_on_a_quantized_base_matches_the_merged_dequantized_reference(
        ckpt, requests, adapters, config, mode, tolerance):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    quantized = Engine.load(ckpt, device="cpu", quantization=mode)
    twin = _dequantized_twin(ckpt, quantized)
    twin_base = outputs(twin, requests)
    with apply_adapter(quantized.model, load_adapter(adapters["one"], config)):
        out = outputs(quantized, requests)
    merge_adapter(twin.model, adapters["one"])
    reference = outputs(twin, requests)
    for task in ("understand", "generate", "edit"):
        first = (lambda t: t[0]) if task == "understand" else (lambda t: t)  # answers may part after a step
        assert _frobenius_rel(first(out[task]), first(reference[task])) < tolerance, task
        assert _frobenius_rel(first(reference[task]), first(twin_base[task])) > 3 * tolerance, task


def test_a_bf16_adapter_on_a_bf16_base_matches_the_float32_merge(ckpt, requests, adapters, config):
    """bf16, as on CUDA: the low-rank path runs in bf16 too (measured 0.025 on the generate
    latent against the float32 merge; the bf16 base alone against the float32 base: 0.019)."""
    bf16 = Engine.load(ckpt, device="cpu", dtype="bfloat16")
    with apply_adapter(bf16.model, load_adapter(adapters["one"], config, dtype=torch.bfloat16)):
        out = outputs(bf16, requests[1:2])
    reference = outputs(_merged_engine(ckpt, adapters["one"]), requests[1:2])
    assert _frobenius_rel(out["generate"].float(), reference["generate"]) < 0.1


# ---- bagel make-adapter ----------------------------------------------------------------------

def test_make_adapter_cli_writes_peft_files_that_load(ckpt, config, tmp_path):
    out = tmp_path / "cli-adapter"
    run = subprocess.run([sys.executable, "-m", "bagel.cli", "make-adapter", "--checkpoint", str(ckpt),
                          "--out", str(out), "--rank", "3", "--alpha", "6", "--targets", "q_proj,gate_proj",
                          "--seed", "4"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert f"wrote a rank-3 LoRA adapter (seed 4) to {out}" in run.stdout
    written = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert (written["peft_type"], written["r"], written["lora_alpha"]) == ("LORA", 3, 6.0)
    assert "peft_version" in written  # PEFT's own file
    loaded = load_adapter(out, config)
    assert sorted({m.split(".", 4)[-1] for m in loaded.info.target_modules}) == [
        "mlp.gate_proj", "mlp_moe_gen.gate_proj", "self_attn.q_proj"]
    again = tmp_path / "again"
    make_test_adapter(ckpt, again, rank=3, alpha=6.0, seed=4, targets=("q_proj", "gate_proj"))
    assert (again / ADAPTER_WEIGHTS_FILE).read_bytes() == (out / ADAPTER_WEIGHTS_FILE).read_bytes()


def test_make_adapter_refuses_bad_targets_and_a_missing_peft(ckpt, tmp_path, capsys, monkeypatch):
    assert main(["make-adapter", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"), "--targets", "fc1"]) == 2
    assert "bagel: error [invalid_input]: targets: 'fc1' names no supported target" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)
    assert main(["make-adapter", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 2
    assert "make-adapter needs the peft package" in capsys.readouterr().err
