"""CPU offload of the decoder layers (``offload="layers"``) on the real tiny engine, on the CPU,
where host and device are the same memory and the same hooks, ordering and buffers run.

The golden checkpoint has 2 layers, which both buffers hold at once; these tests use its
architecture with 5 decoder layers (random weights, ``tiny.RandomWeights``, loaded through
``loading.load_from_sources`` like any checkpoint) so layers really stream, and an odd count
takes the next forward's layer 0 into the other buffer. Covered: results equal the resident
mode bit for bit (understand, generate, edit, think, TaylorSeer; float32, NF4 and INT8 bases);
the layers' tensors live outside the device buffers, at most two layers are staged during a
forward, each layer is copied once per forward; a forward that raises leaves the layers on
the host; the memory model's device and host bytes (and the README's figures); a bad mode is
refused; the worker setting and the CLI flag reach ``Engine.load``. On CUDA (marked ``gpu``):
the layers in pinned host memory, the results equal in bf16, the device memory saved.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel import offload
from bagel.config import GenerationParams, ModelConfig
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.loading import load_checkpoint, load_from_sources, paper_layer_tensor_bytes, paper_weight_bytes
from bagel.memory import WeightPlacement, weight_placement
from bagel.requests import Request
from bagel.tiny import RandomWeights, preset_config
from bagel.tokenizer import Tokenizer

LAYERS = 5
README = Path(__file__).resolve().parent.parent / "README.md"
QUANTIZATIONS = ["none", "nf4", "int8"]
FAST = {"num_timesteps": 3, "max_think_tokens": 4, "max_new_tokens": 5}


def _needs_bitsandbytes(quantization: str) -> None:
    if quantization != "none":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


@pytest.fixture(scope="module")
def deep(golden_dir) -> tuple[ModelConfig, Tokenizer]:
    """The golden architecture with ``LAYERS`` decoder layers and 32-px minimum picture sides."""
    config = ModelConfig.from_folder(golden_dir)
    constants = replace(config.constants, vae_min_px=32, vit_min_px=32)
    config = replace(config, llm=replace(config.llm, num_hidden_layers=LAYERS), constants=constants)
    return config, Tokenizer.from_dir(golden_dir)


@pytest.fixture(scope="module")
def engines(deep):
    """``engines(quantization, offload)``: one engine per mode, loaded on first use."""
    config, tokenizer = deep
    made: dict[tuple[str, str], Engine] = {}

    def get(quantization: str, offload_mode: str) -> Engine:
        _needs_bitsandbytes(quantization)
        if (quantization, offload_mode) not in made:
            weights = RandomWeights(config, tokenizer, seed=3, device=torch.device("cpu"), dtype=torch.float32,
                                    label="deep tiny")
            checkpoint = load_from_sources(config, tokenizer, weights.ema, weights.ae, label="deep tiny",
                                           quantization=quantization, offload=offload_mode)
            made[quantization, offload_mode] = Engine(checkpoint)
        return made[quantization, offload_mode]

    return get


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _requests() -> list[Request]:
    return [
        Request("understand", "What is this?", images=[_picture(1)], params=GenerationParams(seed=1, **FAST)),
        Request("understand", "Why?", think=True, images=[_picture(1)], params=GenerationParams(seed=2, **FAST)),
        Request("generate", "a red mug", width=32, height=48, params=GenerationParams(seed=3, **FAST)),
        Request("generate", "a blue bag", think=True, width=32, height=32, params=GenerationParams(seed=4, **FAST)),
        Request("generate", "a green cup", width=32, height=32,
                params=GenerationParams(seed=5, num_timesteps=8, taylorseer=True, taylorseer_warmup=2,
                                        taylorseer_interval=2)),
        Request("edit", "make it red", images=[_picture(2)], params=GenerationParams.for_task("edit", seed=6, **FAST)),
    ]


def _png(image: Image.Image | None) -> bytes | None:
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _outcome(engine: Engine) -> list[dict]:
    results, traces = engine.run_traced(_requests(), record=True)
    out = []
    for result, trace in zip(results, traces, strict=True):
        out.append({"png": _png(result.image), "text": result.text, "think": result.think_text,
                    "latent": trace.get("final_latent"), "logits": trace.get("step_logits")})
    return out


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_offloaded_results_equal_the_resident_ones_bit_for_bit(engines, quantization):
    resident, offloaded = engines(quantization, "none"), engines(quantization, "layers")
    assert resident.checkpoint.offloader is None and offloaded.checkpoint.offload == "layers"
    want, have = _outcome(resident), _outcome(offloaded)
    for i, (w, h) in enumerate(zip(want, have, strict=True)):
        assert (h["png"], h["text"], h["think"]) == (w["png"], w["text"], w["think"]), f"request {i}"
        assert _same(h["latent"], w["latent"]) and _same(h["logits"], w["logits"]), f"request {i}"
    assert sum(o["png"] is not None for o in have) == 4 and all(o["text"] for o in have[:2])


def _slot_pointers(layer) -> list[int]:
    return [slot.get().data_ptr() for slot in offload.layer_slots(layer)]


def test_layers_stream_through_two_buffers_and_each_layer_is_copied_once_per_forward(engines):
    engine = engines("none", "layers")
    off = engine.checkpoint.offloader
    layers = list(engine.model.language_model.model.layers)
    buffers = {t.data_ptr() for t in off.buffer_tensors()}
    assert len(off.layers) == LAYERS and off.device_bytes == 2 * sum(t.nbytes for t in off.host[0])
    for layer in layers:  # between forwards the modules hold the host tensors, not the buffers'
        assert not set(_slot_pointers(layer)) & buffers
    seen: list[tuple[int, tuple, bool]] = []
    forwards = []

    def record(i):
        def hook(module, args):  # registered after the offload's: sees the layer as it computes
            seen.append((i, off.staged, set(_slot_pointers(module)) <= buffers))
        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    handles.append(engine.model.language_model.register_forward_pre_hook(lambda module, args: forwards.append(1)))
    try:
        engine.run([Request("generate", "a mug", width=32, height=32, params=GenerationParams(seed=1, **FAST))])
        copies_before, forwards_before = off.copies, len(forwards)
        engine.run(_requests()[:3])
    finally:
        for handle in handles:
            handle.remove()
    assert [i for i, _, _ in seen] == list(range(LAYERS)) * len(forwards)
    assert all(i in staged and len({s for s in staged if s is not None}) <= 2 for i, staged, _ in seen)
    assert all(in_buffers for _, _, in_buffers in seen)
    # the first forward after the load stages layer 0 itself; from then on the last layer
    # prefetches the next forward's layer 0, so every forward copies each layer exactly once
    assert off.copies - copies_before == LAYERS * (len(forwards) - forwards_before)
    for layer in layers:
        assert not set(_slot_pointers(layer)) & buffers


def test_a_forward_that_raises_leaves_the_layers_on_the_host(engines):
    engine, resident = engines("none", "layers"), engines("none", "none")
    off = engine.checkpoint.offloader
    buffers = {t.data_ptr() for t in off.buffer_tensors()}
    request = Request("generate", "a mug", width=32, height=32, params=GenerationParams(seed=9, **FAST))

    def fail(module, args):
        raise RuntimeError("injected")

    handle = engine.model.language_model.model.layers[2].register_forward_hook(lambda m, a, o: fail(m, a))
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.run([request])
    finally:
        handle.remove()
    for layer in off.layers:
        assert not set(_slot_pointers(layer)) & buffers
    assert _png(engine.run([request])[0].image) == _png(resident.run([request])[0].image)


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_a_loads_host_and_device_bytes_are_the_paper_figures(engines, deep, quantization):
    """On the CPU nothing is pinned: the host holds the layers' tensors as loaded. (NF4 is left
    out: on a CPU with AVX512-BF16 bitsandbytes stores its absmax in bf16 after the first
    forward, half the paper's float32.)"""
    config, _ = deep
    off = engines(quantization, "layers").checkpoint.offloader
    layer = sum(paper_layer_tensor_bytes(config, dtype=torch.float32, quantization=quantization))
    assert (off.host_bytes, off.device_bytes) == (LAYERS * layer, 2 * layer)


def test_the_memory_model_moves_all_but_two_layers_to_the_host():
    config = preset_config("full", 256)  # BAGEL-7B-MoT's shapes, no weights
    n = config.llm.num_hidden_layers
    for quantization in QUANTIZATIONS:
        resident = weight_placement(config, quantization=quantization)
        offloaded = weight_placement(config, quantization=quantization, offload="layers")
        assert resident == WeightPlacement(paper_weight_bytes(config, quantization=quantization), 0)
        sizes = paper_layer_tensor_bytes(config, quantization=quantization)
        decoder = n * sum(sizes)
        assert (resident.device_bytes - offloaded.device_bytes) / decoder == pytest.approx((n - 2) / n)
        block = offload.pinned_allocation_bytes(sum(offload.aligned(s) for s in sizes))
        assert offloaded.host_bytes == n * block and decoder <= offloaded.host_bytes <= 1.2 * decoder
    nf4 = weight_placement(config, quantization="nf4", offload="layers")
    assert nf4.device_bytes < 4 * 2**30 < 8 * 2**30 < nf4.host_bytes + nf4.device_bytes + 2**30


def test_the_readme_states_the_memory_model_figures():
    config = preset_config("full", 256)
    text = README.read_text()
    section = text[text.index("### Small GPUs"):]
    section = section[:section.index("\n### ", 1)]
    labels = {"none": "`none` (bf16)", "int8": "`int8`", "nf4": "`nf4`"}
    for quantization, label in labels.items():
        resident = weight_placement(config, quantization=quantization)
        offloaded = weight_placement(config, quantization=quantization, offload="layers")
        row = (f"| {label} | {resident.device_bytes / 2**30:.1f} GiB | {offloaded.device_bytes / 2**30:.1f} GiB | "
               f"{offloaded.host_bytes / 2**30:.1f} GiB |")
        assert row in section, row


def test_an_unknown_offload_mode_is_refused(golden_dir):
    message = re.escape("offload: 'disk' is not one of ('none', 'layers')")
    with pytest.raises(InputError, match=message):
        Engine.load(golden_dir, device="cpu", offload="disk")
    with pytest.raises(InputError, match=message):
        load_checkpoint(golden_dir, offload="disk")
    with pytest.raises(InputError, match=message):
        Engine.random("tiny", device="cpu", offload="disk")
    with pytest.raises(InputError, match=message):
        weight_placement(preset_config("tiny", 256), offload="disk")
    assert offload.check_mode(None) == "none"


def test_the_worker_setting_reaches_engine_load(monkeypatch, tmp_path, golden_dir):
    from worker.errors import SettingsError
    from worker.gpu import EngineHolder
    from worker.settings import load_settings

    for name in [n for n in __import__("os").environ if n.startswith("BAGEL_JOBS_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    assert load_settings().offload == "none"
    monkeypatch.setenv("BAGEL_JOBS_OFFLOAD", "layers")
    settings = load_settings(model_path=str(golden_dir), device="cpu")
    assert settings.offload == "layers" and settings.masked_dump()["offload"] == "layers"
    engine = EngineHolder(settings).load()
    assert engine.checkpoint.offload == "layers" and engine.checkpoint.offloader is not None
    with pytest.raises(SettingsError, match=r"BAGEL_JOBS_OFFLOAD='disk': Input should be 'none' or 'layers'"):
        load_settings(offload="disk")


def test_the_cli_offload_flag_reaches_the_engine(golden_dir, tmp_path, capsys):
    from bagel.cli import main

    picture = tmp_path / "in.png"
    _picture(4).save(picture)
    args = ["understand", "--model", str(golden_dir), "--image", str(picture), "--prompt", "What is it?",
            "--device", "cpu", "--max-new-tokens", "4", "--seed", "1"]
    assert main([*args, "--offload", "layers"]) == 0
    offloaded = capsys.readouterr().out
    assert main(args) == 0
    assert offloaded == capsys.readouterr().out and offloaded.strip()
    with pytest.raises(SystemExit):
        main([*args, "--offload", "disk"])
    assert "argument --offload: invalid choice: 'disk'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_on_cuda_the_layers_live_in_pinned_memory_and_results_equal_the_resident_ones(deep, quantization):
    _needs_bitsandbytes(quantization)
    config, tokenizer = deep
    outcomes, allocated = {}, {}
    for mode in ("none", "layers"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        weights = RandomWeights(config, tokenizer, seed=3, device=torch.device("cuda"), dtype=torch.bfloat16,
                                label="deep tiny")
        checkpoint = load_from_sources(config, tokenizer, weights.ema, weights.ae, label="deep tiny", device="cuda",
                                       dtype=torch.bfloat16, quantization=quantization, offload=mode)
        torch.cuda.synchronize()
        allocated[mode] = torch.cuda.memory_allocated() - before
        engine = Engine(checkpoint)
        if mode == "layers":
            off = checkpoint.offloader
            host = [t for h in off.host for t in h]
            assert all(t.device.type == "cpu" and t.is_pinned() for t in host)
            assert all(t.device.type == "cuda" for t in off.buffer_tensors())
        outcomes[mode] = _outcome(engine)
        del engine, checkpoint, weights
    for want, have in zip(outcomes["none"], outcomes["layers"], strict=True):
        assert (have["png"], have["text"], have["think"]) == (want["png"], want["text"], want["think"])
    layer = sum(paper_layer_tensor_bytes(config, dtype=torch.bfloat16, quantization=quantization))
    assert allocated["none"] - allocated["layers"] >= (LAYERS - 2) * layer * 0.9
