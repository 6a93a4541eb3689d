"""Checkpoint loading: strict key coverage, clear errors for broken folders, dtypes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel.config import ModelConfig
from bagel.errors import CheckpointError, InputError
from bagel.loading import (
    AE_NAME_MAP,
    EMA_NAME_MAP,
    load_checkpoint,
    paper_weight_bytes,
    should_quantize,
    to_checkpoint_key,
    to_module_key,
)


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
