"""Checkpoint loading: strict key coverage, clear errors for broken folders and sources, dtypes, and
``Engine.random`` (random weights made on the device through the same streamed load)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel.config import GenerationParams, ModelConfig
from bagel.engine import Engine
from bagel.errors import CheckpointError, InputError
from bagel.loading import (
    AE_NAME_MAP,
    EMA_NAME_MAP,
    load_checkpoint,
    load_from_sources,
    open_safetensors,
    paper_weight_bytes,
    should_quantize,
    to_checkpoint_key,
    to_module_key,
)
from bagel.requests import Request
from bagel.tiny import make_tiny
from bagel.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def golden_fp32(golden_dir):
    return load_checkpoint(golden_dir)


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _broken_copy(src: Path, dst: Path, filename: str, edit) -> Path:
    """Copy the checkpoint folder ``src`` to ``dst`` with ``edit`` applied to one weight file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden"))
    tensors = load_file(str(src / filename))
    edit(tensors)
    save_file(tensors, str(dst / filename), metadata={"format": "pt"})
    return dst


def test_every_checkpoint_tensor_lands_in_the_model_unchanged(golden_dir, golden_fp32):
    for filename, module, name_map in (("ema.safetensors", golden_fp32.model, EMA_NAME_MAP),
                                       ("ae.safetensors", golden_fp32.vae, AE_NAME_MAP)):
        state = module.state_dict()
        file_tensors = _file_tensors(golden_dir / filename)
        assert {to_module_key(k, name_map) for k in file_tensors} == set(state)
        for key, tensor in file_tensors.items():
            loaded = state[to_module_key(key, name_map)]
            assert loaded.dtype == torch.float32
            assert torch.equal(loaded, tensor), key


def test_nothing_is_left_on_meta_and_weight_bytes_counts_everything(golden_dir, golden_fp32):
    tensors = [*golden_fp32.model.parameters(), *golden_fp32.model.buffers(),
               *golden_fp32.vae.parameters(), *golden_fp32.vae.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)
    file_bytes = sum(t.numel() * t.element_size() for f in ("ema.safetensors", "ae.safetensors")
                     for t in _file_tensors(golden_dir / f).values())
    assert golden_fp32.weight_bytes == file_bytes
    assert not golden_fp32.model.training and not golden_fp32.vae.training
    assert golden_fp32.tokenizer.eos_id == 482


def test_bf16_load_holds_the_cast_weights(golden_dir):
    ckpt = load_checkpoint(golden_dir, dtype="bf16")
    head = ckpt.model.language_model.lm_head.weight
    assert head.dtype == torch.bfloat16
    expected = _file_tensors(golden_dir / "ema.safetensors")["language_model.lm_head.weight"]
    assert torch.equal(head, expected.to(torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in ckpt.vae.parameters())
    assert ckpt.weight_bytes * 2 == load_checkpoint(golden_dir).weight_bytes


def test_missing_tensor_is_named(golden_dir, tmp_path):
    key = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    folder = _broken_copy(golden_dir, tmp_path / "ckpt", "ema.safetensors", lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert str(folder / "ema.safetensors") in msg
    assert f"missing 1 tensors: {key}" in msg


def test_unexpected_tensors_are_named(golden_dir, tmp_path):
    def add(t):
        t["language_model.model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
        t["not_a_bagel_module.weight"] = torch.zeros(3)

    folder = _broken_copy(golden_dir, tmp_path / "ckpt", "ema.safetensors", add)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert "unexpected 2 tensors" in msg
    assert "language_model.model.layers.0.self_attn.extra_proj.weight" in msg
    assert "not_a_bagel_module.weight" in msg


def test_misshaped_tensor_is_named_with_both_shapes(golden_dir, tmp_path):
    key = "decoder.conv_in.weight"

    def shrink(t):
        t[key] = t[key][:, :8].contiguous()

    folder = _broken_copy(golden_dir, tmp_path / "ckpt", "ae.safetensors", shrink)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert str(folder / "ae.safetensors") in msg
    assert f"{key} has shape [64, 8, 3, 3], the model expects [64, 16, 3, 3]" in msg


def test_missing_config_and_weight_files_are_named(golden_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(golden_dir, folder, ignore=shutil.ignore_patterns("golden"))
    (folder / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ema\.safetensors: file is missing"):
        load_checkpoint(folder)
    (folder / "llm_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"llm_config\.json: file is missing"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_truncated_weight_file_is_a_checkpoint_error(golden_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(golden_dir, folder, ignore=shutil.ignore_patterns("golden"))
    data = (folder / "ae.safetensors").read_bytes()
    (folder / "ae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ae\.safetensors"):
        load_checkpoint(folder)
    (folder / "ae.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: not a readable safetensors file"):
        load_checkpoint(folder)


def test_bad_load_arguments_are_input_errors(golden_dir):
    with pytest.raises(InputError, match="quantization: 'fp8' is not one of"):
        load_checkpoint(golden_dir, quantization="fp8")
    with pytest.raises(InputError, match="dtype: 'float64' is not one of"):
        load_checkpoint(golden_dir, dtype="float64")


def test_name_map_round_trips_and_rejects_unknown_prefixes():
    key = "language_model.model.layers.3.self_attn.q_proj_moe_gen.weight"
    assert to_checkpoint_key(to_module_key(key, EMA_NAME_MAP), EMA_NAME_MAP) == key
    assert to_module_key("encoder.conv_in.weight", AE_NAME_MAP) == "encoder.conv_in.weight"
    assert to_module_key("model.embed_tokens.weight", EMA_NAME_MAP) is None


def test_quantized_set_is_the_decoder_linears_of_both_experts(golden_fp32):
    chosen = [n for n, m in golden_fp32.model.named_modules()
              if isinstance(m, torch.nn.Linear) and should_quantize(n)]
    layers = golden_fp32.config.llm.num_hidden_layers
    assert len(chosen) == layers * 2 * 7  # q, k, v, o, gate, up, down per expert
    assert "language_model.model.layers.0.self_attn.o_proj_moe_gen" in chosen
    assert "language_model.model.layers.1.mlp.down_proj" in chosen
    assert not any("lm_head" in n or "vit_model" in n or "connector" in n or "vae2llm" in n for n in chosen)


def test_paper_weight_bytes_matches_a_real_load(golden_dir, golden_fp32):
    cfg = ModelConfig.from_folder(golden_dir)
    assert paper_weight_bytes(cfg, dtype=torch.float32) == golden_fp32.weight_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_cuda_load_streams_every_tensor_to_the_gpu(golden_dir, quantization):
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    ckpt = load_checkpoint(golden_dir, device="cuda", dtype=torch.bfloat16, quantization=quantization)
    tensors = [*ckpt.model.parameters(), *ckpt.model.buffers(), *ckpt.vae.parameters()]
    assert all(t.device.type == "cuda" for t in tensors)
    assert torch.cuda.memory_allocated() >= ckpt.weight_bytes


class _DroppingSource:
    """A ``TensorSource`` that announces every tensor of a file but never delivers its last one."""

    def __init__(self, inner) -> None:
        self.location = f"{inner.location} (dropping the last tensor)"
        self._inner = inner

    def shapes(self):
        return self._inner.shapes()

    def tensors(self):
        pairs = list(self._inner.tensors())
        yield from pairs[:-1]


def test_a_source_that_does_not_deliver_what_it_announced_is_named(golden_dir):
    config, tokenizer = ModelConfig.from_folder(golden_dir), Tokenizer.from_dir(golden_dir)
    with open_safetensors(golden_dir / "ema.safetensors") as ema, \
            open_safetensors(golden_dir / "ae.safetensors") as ae:
        with pytest.raises(CheckpointError, match=r"ae\.safetensors \(dropping the last tensor\): 1 announced "
                                                  r"tensors never arrived: encoder\.norm_out\.weight"):
            load_from_sources(config, tokenizer, ema, _DroppingSource(ae), label="golden")


# ---- Engine.random: a random checkpoint made on the device, loaded through the same path ----

@pytest.fixture(scope="module")
def random_tiny():
    return Engine.random("tiny", device="cpu", seed=7)


def test_engine_random_holds_exactly_the_tensors_make_tiny_writes(random_tiny, tmp_path):
    folder = make_tiny(tmp_path / "tiny", seed=7)
    from_file = load_checkpoint(folder)
    assert random_tiny.config == from_file.config and random_tiny.dtype == torch.float32
    for ours, theirs in ((random_tiny.model, from_file.model), (random_tiny.vae, from_file.vae)):
        state, expected = ours.state_dict(), theirs.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
    assert random_tiny.checkpoint.weight_bytes == from_file.weight_bytes


@pytest.mark.parametrize(("size", "quantization"), [("tiny", "none"), ("tiny", "nf4"), ("tiny", "int8"),
                                                    ("small", "none")])
def test_engine_random_weight_bytes_are_the_paper_figure(size, quantization):
    if quantization != "none":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    engine = Engine.random(size, device="cpu", quantization=quantization, seed=1)
    ckpt = engine.checkpoint
    assert (ckpt.quantization, ckpt.device.type, ckpt.dtype) == (quantization, "cpu", torch.float32)
    assert ckpt.weight_bytes == paper_weight_bytes(ckpt.config, dtype=torch.float32, quantization=quantization)
    tensors = [*ckpt.model.parameters(), *ckpt.model.buffers(), *ckpt.vae.parameters(), *ckpt.vae.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)


def test_engine_random_generates_and_understands_with_finite_output(random_tiny):
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    results, traces = random_tiny.run_traced([
        Request(task="generate", prompt="a red circle", width=32, height=32,
                params=GenerationParams.for_task("generate", num_timesteps=2, seed=1)),
        Request(task="understand", prompt="What color is it?", images=[picture],
                params=GenerationParams.for_task("understand", max_new_tokens=4, seed=1)),
    ], record=True)
    latent, logits = traces[0]["final_latent"], traces[1]["step_logits"]
    assert torch.isfinite(latent).all() and latent.std() > 0.1
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    assert results[0].image.size == (32, 32) and np.asarray(results[0].image).std() > 0
    assert isinstance(results[1].text, str)


def test_engine_random_same_seed_same_weights_other_seed_other_weights(random_tiny):
    again = Engine.random("tiny", device="cpu", seed=7, dtype="bf16")
    twice = Engine.random("tiny", device="cpu", seed=7, dtype="bf16")
    other = Engine.random("tiny", device="cpu", seed=8, dtype="bf16")
    head = "language_model.lm_head.weight"
    assert again.model.state_dict()[head].dtype == torch.bfloat16
    for key, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, twice.model.state_dict()[key]), key
    assert not torch.equal(again.model.state_dict()[head], other.model.state_dict()[head])


def test_engine_random_refuses_an_unknown_size_and_a_bad_seed():
    with pytest.raises(InputError, match=r"size: 'huge' is not one of \['full', 'small', 'tiny'\]"):
        Engine.random("huge", device="cpu")
    with pytest.raises(InputError, match=r"seed: 2\.5 must be an integer in 0..2\^63-1"):
        Engine.random("tiny", device="cpu", seed=2.5)
    with pytest.raises(InputError, match="quantization: 'fp8' is not one of"):
        Engine.random("tiny", device="cpu", quantization="fp8")
