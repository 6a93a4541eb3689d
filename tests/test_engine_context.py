"""Shared product context, CFG interval and the memory budget, on the golden tiny checkpoint.

A try-on chunk is one product picture × N scene prompts, each with its own seed and one
``context_seed``: the picture must go through the VAE encoder and SigLIP once, and every
request must come out as it does when run alone.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bagel.config import GenerationParams
from bagel.engine import Engine
from bagel.errors import InputError, MemoryBudgetError
from bagel.loading import load_checkpoint
from bagel.memory import Footprint, MemoryModel
from bagel.requests import Request
from bagel.sampler import make_schedule

FAST = dict(num_timesteps=3)


@pytest.fixture(scope="module")
def engine(golden_dir):
    """The golden checkpoint with the transforms' minimum sides lowered to 64 px (as the
    benchmark does), so an edit works on a 64x64 picture: cheap, and the same code path."""
    checkpoint = load_checkpoint(golden_dir, device="cpu", dtype=torch.float32)
    consts = replace(checkpoint.config.constants, vae_min_px=64, vit_min_px=64)
    return Engine(replace(checkpoint, config=replace(checkpoint.config, constants=consts)))


@pytest.fixture(scope="module")
def product():
    """A 64x64 picture: VAE latent 8x8, 4x4 latent patches per query block."""
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


class EncoderCalls:
    """Counts pictures through the VAE encoder and SigLIP with forward pre-hooks."""

    def __init__(self, engine):
        self.vae = self.vit = 0
        self._handles = [engine.vae.encoder.register_forward_pre_hook(self._on_vae),
                         engine.model.vit_model.register_forward_pre_hook(self._on_vit)]

    def _on_vae(self, module, args):
        self.vae += int(args[0].shape[0])

    def _on_vit(self, module, args):
        self.vit += int(args[2].numel()) - 1  # cu_seqlens has one more entry than pictures

    def close(self):
        for h in self._handles:
            h.remove()


def scene(product, prompt, seed, context_seed=1234, **params):
    return Request("edit", prompt, images=[product], context_seed=context_seed,
                   params=GenerationParams.for_task("edit", seed=seed, **{**FAST, **params}))


def pixels(result):
    return np.asarray(result.image, dtype=np.int16)


def test_tryon_chunk_encodes_the_product_once_and_equals_each_scene_alone(engine, product):
    prompts = ["on a beach", "in a forest", "on a marble table"]
    requests = [scene(product, p, seed=40 + k) for k, p in enumerate(prompts)]
    calls = EncoderCalls(engine)
    try:
        batched, traces = engine.run_traced(requests, record=True)
        assert (calls.vae, calls.vit) == (1, 1)
    finally:
        calls.close()
    assert all(r.stats["run_context_encodes"] == 1 for r in batched)
    assert batched[0].stats["context_encodes"] == 1 and batched[1].stats["context_encodes"] == 0
    for k, request in enumerate(requests):
        (alone,), (trace,) = engine.run_traced([request], record=True)
        diff = (traces[k]["final_latent"] - trace["final_latent"]).abs().max().item()
        assert diff <= 1e-3, f"scene {k}: final latent differs by {diff:.3g}"
        assert np.abs(pixels(batched[k]) - pixels(alone)).max() <= 1
    # different seeds still give different pictures from the shared context
    assert not np.array_equal(pixels(batched[0]), pixels(batched[1]))


def test_without_context_seed_each_seed_draws_its_own_posterior(engine, product):
    requests = [scene(product, "on a beach", seed=40 + k, context_seed=None) for k in range(2)]
    calls = EncoderCalls(engine)
    try:
        results = engine.run(requests)
    finally:
        calls.close()
    # one encoder pass for the picture, two posterior draws → two picture contexts
    assert (calls.vae, calls.vit) == (1, 1)
    assert results[0].stats["run_context_encodes"] == 1
    (alone,) = engine.run([requests[1]])
    assert np.abs(pixels(results[1]) - pixels(alone)).max() <= 1


def test_context_seed_replaces_the_posterior_draw_of_the_request_seed(engine, product):
    a, b = engine.run([scene(product, "on a beach", seed=5, context_seed=1),
                       scene(product, "on a beach", seed=5, context_seed=2)])
    assert not np.array_equal(pixels(a), pixels(b))
    (c,) = engine.run([scene(product, "on a beach", seed=5, context_seed=1)])
    assert np.abs(pixels(a) - pixels(c)).max() <= 1  # batched with b vs alone: float order only


def test_context_seed_is_checked(product):
    with pytest.raises(InputError, match=r"context_seed: -1 must be an integer in 0\.\.2\^63-1"):
        scene(product, "x", seed=1, context_seed=-1)
    with pytest.raises(InputError, match="context_seed: give either context_seed or posterior_noise"):
        Request("edit", "x", images=[product], context_seed=3, posterior_noise=torch.zeros(1, 16, 8, 8))


@pytest.mark.parametrize("naive", [False, True])
def test_cfg_branches_run_only_inside_the_cfg_interval(engine, naive):
    params = GenerationParams(seed=3, num_timesteps=8, cfg_interval=(0.5, 1.0), cfg_text_scale=4.0)
    (result,) = engine.run([Request("generate", "a red circle", width=32, height=32, params=params)], naive=naive)
    on = make_schedule(8, params.timestep_shift, params.cfg_interval).cfg_on
    assert 0 < sum(on) < len(on), "the interval must cut the schedule for this test to mean anything"
    rows = 2 * 2 + 2  # a 32x32 px picture is 2x2 latent patches, plus the two marker tokens
    assert result.stats["run_denoise_forward_tokens"] == sum((2 if c else 1) * rows for c in on)
    if naive:  # one forward per branch and step, after the prefill of the prompt and empty context
        assert result.stats["llm_forwards"] - result.stats["run_denoise_forward_tokens"] // rows == 1


def test_denoise_seconds_is_reported(engine):
    params = GenerationParams(seed=3, num_timesteps=3)
    (result,) = engine.run([Request("generate", "a", width=32, height=32, params=params)])
    assert 0 < result.stats["denoise_seconds"] <= result.stats["model_seconds"]


def test_memory_estimate_grows_per_extra_request(engine, product):
    one = engine.memory_estimate([scene(product, "a", seed=1)])
    two = engine.memory_estimate([scene(product, "a", seed=1), scene(product, "b", seed=2)])
    extra = two.total - one.total
    assert 0 < extra < one.total
    # the shared product context is counted once: the second scene adds less KV than the first
    assert two.kv_cache - one.kv_cache < one.kv_cache
    assert "MiB (KV cache" in two.describe()


def test_memory_model_counts_every_segment_of_an_attention_call(engine):
    """A denoising step attends every request's CFG blocks in one SDPA call: a try-on chunk of 8
    edits (3 blocks each) holds 24 score matrices at once. Flash kernels over a paged cache
    hold none (their log-sum-exp only, plus the gathered keys where the kernel reads no pages)
    but round every cache allocation up to a page."""
    llm = engine.config.llm
    edit = Footprint(kv_tokens=100, loop_rows=3 * 66, widest_segment=(40, 40), prefill_rows=40, latent_elems=0,
                     out_pixels=0, in_pixels=0, loop_segments=((66, 300),) * 3, allocations=9)
    kv_row = 2 * llm.num_key_value_heads * llm.head_dim * 4
    one_block = 4 * llm.num_attention_heads * 66 * 300 + 300 * kv_row
    sdpa = MemoryModel(engine.config, torch.float32, 1 << 16)
    assert sdpa.attention_bytes([edit], 198) == 3 * one_block
    assert sdpa.attention_bytes([edit] * 8, 8 * 198) == 24 * one_block
    paged = MemoryModel(engine.config, torch.float32, 1 << 16, page_size=256)
    assert paged.attention_bytes([edit] * 8, 8 * 198) == 4 * llm.num_attention_heads * 8 * 198
    assert paged.kv_slots([edit] * 8) == sdpa.kv_slots([edit] * 8) + 8 * 9 * 256
    # a kernel that gathers its keys out of the pages (torch 2.11) holds one layer's copy of them
    gather = MemoryModel(engine.config, torch.float32, 1 << 16, page_size=256, gathers_keys=True)
    assert gather.attention_bytes([edit] * 8, 8 * 198) == 4 * llm.num_attention_heads * 8 * 198 + 24 * 300 * kv_row


def test_a_batch_over_the_budget_runs_as_sub_batches_with_the_same_results(engine, product):
    requests = [scene(product, f"scene {k}", seed=60 + k) for k in range(4)]
    budget = engine.memory_estimate(requests[:2]).total + 1
    assert engine.memory_estimate(requests).total > budget
    limited = Engine(engine.checkpoint, memory_budget_bytes=budget)
    split, split_traces = limited.run_traced(requests, record=True)
    whole, whole_traces = engine.run_traced(requests, record=True)
    assert [r.stats["run_batches"] for r in split] == [2] * 4
    assert whole[0].stats["run_batches"] == 1
    for k in range(4):
        diff = (split_traces[k]["final_latent"] - whole_traces[k]["final_latent"]).abs().max().item()
        assert diff <= 1e-3, f"request {k}: final latent differs by {diff:.3g}"


def test_a_request_over_the_budget_alone_is_refused_before_any_work(engine, product):
    requests = [scene(product, "a", seed=1)]
    need = engine.memory_estimate(requests).total
    limited = Engine(engine.checkpoint, memory_budget_bytes=need // 2)
    calls = EncoderCalls(limited)
    try:
        with pytest.raises(MemoryBudgetError, match=r"requests\[0\]: needs an estimated .* MiB \(KV cache .*\), "
                                                    r"over the memory_budget_bytes limit of .* MiB even on its own"):
            limited.run(requests)
    finally:
        calls.close()
    assert (calls.vae, calls.vit) == (0, 0)
    with pytest.raises(InputError, match="memory_budget_bytes: 0 must be a positive number of bytes"):
        Engine(engine.checkpoint, memory_budget_bytes=0)
