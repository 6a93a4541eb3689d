"""LLM, packing and KV cache: key layout, cached vs uncached, packed vs separate, expert routing."""

import pytest
import torch
from safetensors import safe_open

from bagel.config import ModelConfig
from bagel.kv_cache import EMPTY, CacheSeq, KVCache
from bagel.attention import causal_bottom_right
from bagel.llm import CPU_MLP_ROW_BLOCK, MLP, RMSNorm
from bagel.loading import load_checkpoint
from bagel.model import BagelModel, timestep_features
from bagel.packing import PackBuilder


@pytest.fixture(scope="module")
def loaded(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype=torch.float32)


def _cache(cfg, capacity=256):
    llm = cfg.llm
    return KVCache(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, capacity, "cpu", torch.float32)


def _run(model, batch, cache, latent_rows=None):
    lm = model.language_model
    text = lm.embed(batch.text_ids)
    x = text.new_zeros(batch.length, text.shape[1])
    x[batch.text_index] = text
    if latent_rows is not None:
        x[batch.row_index["latent"]] = latent_rows
    return lm(x, batch, cache)


def _forward(model, builder, cache, latent_rows=None):
    return _run(model, builder.build("cpu"), cache, latent_rows)


def test_state_dict_keys_and_shapes_equal_the_checkpoint(golden_dir):
    cfg = ModelConfig.from_folder(golden_dir)
    with torch.device("meta"):
        model = BagelModel(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(golden_dir / "ema.safetensors"), "pt") as f:
        theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert ours == theirs
    assert not list(model.buffers()), "no buffers: every tensor comes from the checkpoint"


@torch.inference_mode()
def test_cached_prefill_equals_one_uncached_pass(loaded):
    model, cfg = loaded.model, loaded.config
    ids_a, ids_b = [481, 39, 68, 273, 482], [481, 78, 266, 78, 81, 387, 482]
    cache = _cache(cfg)
    b1 = PackBuilder(cache)
    ctx = b1.add_text(ids_a, EMPTY)
    _forward(model, b1, cache)
    b2 = PackBuilder(cache)
    b2.add_text(ids_b, ctx)
    cached = _forward(model, b2, cache)
    b3 = PackBuilder(None)
    b3.add_text(ids_a + ids_b, EMPTY, write=False)
    whole = _forward(model, b3, None)
    assert torch.allclose(cached, whole[len(ids_a):], atol=1e-5)


@torch.inference_mode()
def test_packed_segments_equal_separate_forwards(loaded):
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    cache = _cache(cfg)
    b = PackBuilder(cache)
    ctx_a = b.add_text([481, 39, 68, 482], EMPTY)
    ctx_b = b.add_text([481, 77, 68, 86, 291, 482], EMPTY)
    _forward(model, b, cache)
    torch.manual_seed(0)
    rows = torch.randn(6, cfg.llm.hidden_size)
    packed = PackBuilder(cache)
    _, blk_a = packed.add_image_block("latent", 6, ctx_a, tok.start_of_image_id, tok.end_of_image_id, write=False)
    _, blk_b = packed.add_image_block("latent", 6, ctx_b, tok.start_of_image_id, tok.end_of_image_id, write=False)
    out = _forward(model, packed, cache, torch.cat([rows, rows]))
    for ctx, blk in ((ctx_a, blk_a), (ctx_b, blk_b)):
        alone = PackBuilder(cache)
        _, blk1 = alone.add_image_block("latent", 6, ctx, tok.start_of_image_id, tok.end_of_image_id, write=False)
        single = _forward(model, alone, cache, rows)
        assert torch.allclose(out[blk.rows], single[blk1.rows], atol=1e-5)
    assert not torch.allclose(out[blk_a.rows], out[blk_b.rows]), "different contexts give different rows"


@pytest.mark.parametrize("n", [4, 30, 126])  # 126: few enough marker rows for the dense path
@torch.inference_mode()
def test_latent_rows_use_the_generation_expert(loaded, n):
    """Zeroing the last layer's generation-expert MLP changes latent rows, not the marker rows."""
    import copy

    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    twin = copy.deepcopy(model)
    twin.language_model.model.layers[-1].mlp_moe_gen.down_proj.weight.zero_()
    torch.manual_seed(0)
    rows = torch.randn(n, cfg.llm.hidden_size)
    outs = []
    for m in (model, twin):
        b = PackBuilder(None)
        b.add_image_block("latent", n, EMPTY, tok.start_of_image_id, tok.end_of_image_id, write=False)
        outs.append(_forward(m, b, None, rows))
    assert torch.equal(outs[0][0], outs[1][0])  # <|vision_start|>: understanding expert
    assert torch.equal(outs[0][n + 1], outs[1][n + 1])  # <|vision_end|>
    assert not torch.allclose(outs[0][1:n + 1], outs[1][1:n + 1])


@torch.inference_mode()
def test_dense_generation_expert_equals_routing_every_row(loaded):
    """A denoising-shaped forward (few marker rows) runs the generation expert over all rows and
    redoes the markers; the result equals gathering and scattering each expert's rows."""
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    torch.manual_seed(1)
    b = PackBuilder(None)
    for _ in range(3):
        b.add_image_block("latent", 126, EMPTY, tok.start_of_image_id, tok.end_of_image_id, write=False)
    batch = b.build("cpu")
    assert batch.gen_dense and batch.und_index.numel() == 6
    latents = torch.randn(3 * 126, cfg.llm.hidden_size)
    dense = _run(model, batch, None, latents)
    batch.gen_dense = False
    routed = _run(model, batch, None, latents)
    torch.testing.assert_close(dense, routed, rtol=1e-5, atol=1e-5)

    small = PackBuilder(None)
    small.add_image_block("latent", 30, EMPTY, tok.start_of_image_id, tok.end_of_image_id, write=False)
    assert not small.build("cpu").gen_dense  # 2 of 32 rows: routed


@torch.inference_mode()
def test_feed_forward_in_row_blocks_equals_one_pass():
    torch.manual_seed(2)
    mlp = MLP(64, 176)
    x = torch.randn(3 * CPU_MLP_ROW_BLOCK + 7, 64)
    torch.testing.assert_close(mlp(x), mlp._rows(x), rtol=1e-5, atol=1e-5)


def test_image_block_positions_and_rope_advance():
    cache = KVCache(1, 1, 4, 64, "cpu", torch.float32)
    b = PackBuilder(cache)
    ctx = b.add_text([1, 2, 3], EMPTY)
    ctx2, blk = b.add_image_block("vit", 5, ctx, 7, 8)
    batch = b.build("cpu")
    assert batch.positions.tolist() == [0, 1, 2] + [3] * 7
    assert (ctx.rope, ctx.length, ctx2.rope, ctx2.length) == (3, 3, 4, 10)
    assert batch.row_index["vit"].tolist() == list(range(4, 9)) and blk.rows == slice(4, 9)
    assert batch.gen_index is None
    assert [s.is_causal for s in batch.segments] == [True, False]


def test_causal_mask_is_aligned_bottom_right():
    mask = causal_bottom_right(2, 5, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, True, False], [True] * 5]


def test_kv_cache_fork_shares_slots_and_growth_keeps_contents():
    cache = KVCache(2, 1, 2, 16, "cpu", torch.float32)
    base, start, _ = cache.extend(EMPTY, 10, 10)
    cache.write(1, start, torch.ones(10, 1, 2), torch.full((10, 1, 2), 2.0))
    fork_a, _, _ = cache.extend(base, 3, 3)
    fork_b, sb, copy = cache.extend(base, 4, 4)
    assert copy is None  # an unpaged cache never copies
    assert fork_a.ranges == ((0, 13),) and fork_b.ranges == ((0, 10), (13, 17))
    assert cache.capacity >= 17 and cache.grow_count == 1
    cache.write(1, sb, torch.zeros(4, 1, 2), torch.zeros(4, 1, 2))
    keys, values = cache.read(1, fork_b)
    assert keys.shape == (14, 1, 2) and keys[:10].eq(1).all() and values[:10].eq(2).all()
    assert CacheSeq(((0, 2),), 2).with_range(2, 3, 1).ranges == ((0, 5),)


def test_rms_norm_keeps_statistics_in_float32_for_bfloat16():
    norm = RMSNorm(64, 1e-6)
    x = torch.randn(8, 64) * 1e3
    ref = norm(x)
    got = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_timestep_features_order_is_cos_then_sin():
    f = timestep_features(torch.tensor([0.0]))
    assert f.shape == (1, 256)
    assert torch.equal(f[0, :128], torch.ones(128)) and torch.equal(f[0, 128:], torch.zeros(128))


@torch.inference_mode()
def test_batched_attention_calls_equal_attention_per_segment(loaded):
    """Query blocks over contexts of different lengths (padding), one of them in two slot
    ranges (a fork), one much longer (its own call): the batched calls over scratch slots
    equal one call per segment."""
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    cache = _cache(cfg)
    b = PackBuilder(cache)
    ctx_a = b.add_text([481, 39, 68, 482], EMPTY)
    ctx_b = b.add_text([481, 77, 68, 86, 291, 482], EMPTY)
    ctx_d = b.add_text([481, *range(40, 78), 482], EMPTY)
    _forward(model, b, cache)
    fork = PackBuilder(cache)
    ctx_c = fork.add_text([481, 5, 482], ctx_a)
    _forward(model, fork, cache)
    assert len(ctx_c.ranges) == 2
    torch.manual_seed(0)
    rows = torch.randn(4 * 2, cfg.llm.hidden_size)
    packed = PackBuilder(cache)
    for ctx in (ctx_a, ctx_b, ctx_c, ctx_d):  # blocks of 2 latent rows + 2 markers
        packed.add_image_block("latent", 2, ctx, tok.start_of_image_id, tok.end_of_image_id, write=False)
    per_segment = packed.build("cpu")
    batched = packed.build("cpu", scratch_start=cache.allocate(packed.length))
    assert per_segment.uniform is None and batched.uniform is not None
    # key counts 8, 10, 11, 44: a call pads its shortest segment by at most 20 %
    assert [tuple(g.key_mask.shape) for g in batched.uniform.groups] == [(2, 1, 1, 10), (1, 1, 1, 11),
                                                                          (1, 1, 1, 44)]
    expected = _run(model, per_segment, cache, rows)
    assert torch.allclose(_run(model, batched, cache, rows), expected, atol=1e-5)


@torch.inference_mode()
def test_batched_decode_step_equals_decoding_each_stream_alone(loaded):
    model, cfg = loaded.model, loaded.config
    cache = _cache(cfg)
    b = PackBuilder(cache)
    contexts = [b.add_text([481, 39, 68, 482], EMPTY), b.add_text([481, 77, 68, 86, 291, 482], EMPTY)]
    _forward(model, b, cache)
    slots = [cache.allocate(1), cache.allocate(1)]
    step = PackBuilder(cache)
    for ctx, slot in zip(contexts, slots):
        step.add_text([481], ctx, slot=slot)
    batch = step.build("cpu")
    assert batch.uniform is not None and batch.uniform.query_len == 1
    together = _run(model, batch, cache)
    for k, (ctx, slot) in enumerate(zip(contexts, slots)):
        alone = PackBuilder(cache)
        alone.add_text([481], ctx, slot=slot)
        assert torch.allclose(together[k], _run(model, alone.build("cpu"), cache)[0], atol=1e-5)


@torch.inference_mode()
def test_equal_length_causal_segments_keep_their_causal_mask(loaded):
    model, cfg = loaded.model, loaded.config
    ids = [[481, 39, 68, 482], [481, 77, 86, 482]]
    cache = _cache(cfg)
    b = PackBuilder(cache)
    for seq in ids:
        b.add_text(seq, EMPTY)
    batch = b.build("cpu")
    assert batch.uniform is not None and batch.uniform.groups[0].key_mask.shape == (2, 1, 4, 4)
    together = _run(model, batch, cache)
    for k, seq in enumerate(ids):
        alone = PackBuilder(None)
        alone.add_text(seq, EMPTY, write=False)
        assert torch.allclose(together[4 * k:4 * k + 4], _run(model, alone.build("cpu"), None), atol=1e-5)
