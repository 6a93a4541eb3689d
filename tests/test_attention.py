"""The CUDA attention path checked on the CPU: the paged-cache layout and the exact metadata the
variable-length flash kernels receive (cu_seq_q, block tables, seqused_k, page copies), fed to a
pure-PyTorch kernel with the same contract and compared with today's SDPA results."""

from dataclasses import replace

import pytest
import torch
from PIL import Image

from bagel.attention import PAGE_SIZE, SdpaAttention, VarlenAttention, resolve_attention
from bagel.config import GenerationParams
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.kv_cache import EMPTY, KVCache, SlotCopy
from bagel.loading import load_checkpoint
from bagel.packing import PackBuilder
from bagel.parity import verify_folder
from bagel.requests import Request
from tests.varlen_reference import make_gather_reference, make_reference

TAYLORSEER_CASES = ("t2i_taylorseer", "edit_taylorseer", "t2i_think_taylorseer")


@pytest.fixture(scope="module")
def checkpoint(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def small_pictures(checkpoint):
    """The golden checkpoint with the transforms' minimum sides lowered to 64 px, so a try-on
    edit works on its 96x80 picture as it is (cheap, the same code path)."""
    consts = replace(checkpoint.config.constants, vae_min_px=64, vit_min_px=64)
    return replace(checkpoint, config=replace(checkpoint.config, constants=consts))


def _reference_engine(checkpoint, page_size, gathers_keys=False):
    if gathers_keys:
        attention = VarlenAttention(make_gather_reference(), name="reference-gather", page_size=page_size,
                                    gathers_keys=True)
    else:
        attention = VarlenAttention(make_reference(min_page=16), name="reference", page_size=page_size)
    return Engine(checkpoint, attention=attention)


def test_golden_cases_pass_through_the_paged_varlen_path(golden_dir, checkpoint):
    """The real page size (the FlashAttention-2 paged kernels' minimum), the reference kernel
    demanding it: every golden case, TaylorSeer included, still matches the reference."""
    engine = Engine(checkpoint, attention=VarlenAttention(make_reference(min_page=PAGE_SIZE), name="reference"))
    try:
        cases = ["understand", "understand_think", "t2i", "t2i_think", "edit", "edit_global", "t2i_multi",
                 *TAYLORSEER_CASES]
        reports = verify_folder(golden_dir, engine=engine, only=cases)
    finally:
        checkpoint.model.language_model.model.attention = SdpaAttention()
    assert [r.case_id for r in reports] == cases
    assert all(r.ok for r in reports), [r.detail for r in reports if not r.ok]


def _mixed_requests():
    product = Image.new("RGB", (96, 80), (200, 40, 40))
    for x in range(0, 96, 8):
        product.putpixel((x, x % 80), (10, 220, 30))
    steps = GenerationParams(num_timesteps=4, seed=3, max_think_tokens=12)
    return [
        *(Request("edit", f"put it on a table, scene {k}", images=[product], context_seed=99,
                  params=GenerationParams.for_task("edit", num_timesteps=4, seed=10 + k)) for k in range(3)),
        Request("generate", "a red bag on a beach", think=True, width=64, height=48, params=steps),
        Request("understand", "what colour is it?", images=[product], think=True,
                params=GenerationParams(max_new_tokens=10, seed=5)),
    ]


@pytest.mark.parametrize("gathers_keys", [False, True], ids=["paged", "gather"])
@pytest.mark.parametrize("page_size", [16, PAGE_SIZE])
def test_paged_varlen_batch_equals_sdpa(small_pictures, page_size, gathers_keys):
    """A try-on chunk sharing one product (forks of a shared context, partial pages moved), a
    think generation and an understanding: the paged path gives the SDPA path's results, with
    a kernel reading the pages through block tables and with one taking gathered keys."""
    sdpa = Engine(small_pictures)
    expected, expected_traces = sdpa.run_traced(_mixed_requests(), record=True)
    try:
        paged = _reference_engine(small_pictures, page_size, gathers_keys)
        got, traces = paged.run_traced(_mixed_requests(), record=True)
    finally:
        small_pictures.model.language_model.model.attention = SdpaAttention()
    for want, have, want_tr, have_tr in zip(expected, got, expected_traces, traces):
        assert have.text == want.text and have.think_text == want.think_text
        if want.image is not None:
            diff = (have_tr["final_latent"] - want_tr["final_latent"]).abs().max().item()
            assert diff < 1e-4, diff
    assert got[0].stats["run_context_encodes"] == expected[0].stats["run_context_encodes"]


def test_paged_cache_continues_in_place_and_a_fork_moves_only_the_partial_page():
    cache = KVCache(1, 1, 2, 64, "cpu", torch.float32, page_size=16)
    ctx, start, copy = cache.extend(EMPTY, 20, 20)
    assert (ctx.ranges, start, copy) == (((0, 20),), 0, None)
    first, start, copy = cache.extend(ctx, 3, 3)  # nothing allocated after ctx: continue in place
    assert (first.ranges, start, copy) == (((0, 23),), 20, None)
    second, start, copy = cache.extend(ctx, 5, 5)  # a fork: its 4-key partial page is moved
    assert second.ranges == ((0, 16), (32, 41)) and start == 36 and copy == SlotCopy(16, 32, 4)
    whole, start, _ = cache.extend(EMPTY, 32, 32)  # whole pages: a fork of it copies nothing
    assert whole.ranges == ((48, 80),) and start == 48
    cache.extend(EMPTY, 1, 1)
    fork, start, copy = cache.extend(whole, 3, 3)
    assert fork.ranges == ((48, 80), (96, 99)) and copy is None
    assert cache.capacity % 16 == 0 and cache.used == 99


@torch.inference_mode()
def test_varlen_metadata_of_a_fork_and_a_denoising_step(checkpoint):
    """The exact kernel inputs for a prefill, a fork and a denoising step over two contexts,
    and the outcome of the reference kernel equal to SDPA per segment."""
    model, cfg, tok = checkpoint.model, checkpoint.config, checkpoint.tokenizer
    llm = cfg.llm
    paged = KVCache(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, 64, "cpu", torch.float32,
                    page_size=16)
    flat = KVCache(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, 64, "cpu", torch.float32)
    lm = model.language_model
    reference = VarlenAttention(make_reference(min_page=16), name="reference", page_size=16)

    def run(batch, cache, attention, latent=None):
        lm.model.attention = attention
        text = lm.embed(batch.text_ids)
        x = text.new_zeros(batch.length, text.shape[1])
        x[batch.text_index] = text
        if latent is not None:
            x[batch.row_index["latent"]] = latent
        return lm(x, batch, cache)

    ids = [481, *range(40, 58), 482]  # 20 tokens
    contexts = {}
    try:
        for cache, attention in ((paged, reference), (flat, SdpaAttention())):
            b = PackBuilder(cache)
            ctx = b.add_text(ids, EMPTY)
            prefill = b.build("cpu")
            out0 = run(prefill, cache, attention)
            fork = PackBuilder(cache)
            child_a = fork.add_text([481, 5, 482], ctx)
            child_b = fork.add_text([481, 6, 7, 8, 482], ctx)
            forked = fork.build("cpu")
            out1 = run(forked, cache, attention)
            step = PackBuilder(cache)
            for c in (child_b, ctx):
                step.add_image_block("latent", 2, c, tok.start_of_image_id, tok.end_of_image_id, write=False)
            torch.manual_seed(0)
            latent = torch.randn(4, llm.hidden_size)
            denoise = step.build("cpu", scratch_start=cache.allocate(step.scratch_slots()))
            out2 = run(denoise, cache, attention, latent)
            contexts[attention.name] = (prefill, forked, denoise, out0, out1, out2, child_a, child_b)
    finally:
        lm.model.attention = SdpaAttention()
    prefill, forked, denoise, *outs_paged, child_a, child_b = contexts["reference"]
    *_, out0, out1, out2, _, _ = contexts["sdpa"]

    (call,) = prefill.varlen.calls
    assert call.causal and call.rows is None
    assert call.cu_seq_q.tolist() == [0, 20] and call.seqused_k.tolist() == [20]
    assert call.block_table.tolist() == [[0, 1]] and (call.max_q, call.max_k) == (20, 20)
    assert prefill.varlen.write_slots.tolist() == list(range(20)) and prefill.varlen.copy_src is None

    # child a continues in place after the context; child b's fork moves the 4-key partial page
    assert child_a.ranges == ((0, 23),) and child_b.ranges == ((0, 16), (32, 41))
    (call,) = forked.varlen.calls
    assert call.cu_seq_q.tolist() == [0, 3, 8] and call.seqused_k.tolist() == [23, 25]
    assert call.cu_seq_k.tolist() == [0, 23, 48] and call.block_table.tolist() == [[0, 1], [0, 2]]
    assert forked.varlen.copy_src.tolist() == [16, 17, 18, 19] and forked.varlen.copy_dst.tolist() == [32, 33, 34, 35]
    assert forked.varlen.write_slots.tolist() == [20, 21, 22, 36, 37, 38, 39, 40]

    # denoising: both query blocks read page 0 of the shared context in place; each gets a
    # scratch run (from slot 48) holding its context's partial page and then its own 4 rows
    (call,) = denoise.varlen.calls
    assert not call.causal and call.rows is None
    assert call.block_table.tolist() == [[0, 3], [0, 4]] and call.seqused_k.tolist() == [29, 24]
    assert call.cu_seq_q.tolist() == [0, 4, 8] and call.cu_seq_k.tolist() == [0, 29, 53]
    assert (call.max_q, call.max_k) == (4, 29)
    assert denoise.varlen.copy_src.tolist() == [*range(32, 41), *range(16, 20)]
    assert denoise.varlen.copy_dst.tolist() == [*range(48, 57), *range(64, 68)]
    assert denoise.varlen.write_slots.tolist() == [*range(57, 61), *range(68, 72)]

    for paged_out, flat_out in zip(outs_paged, (out0, out1, out2)):
        assert torch.allclose(paged_out, flat_out, atol=1e-5)


@torch.inference_mode()
def test_a_prefill_mixing_text_and_picture_blocks_makes_a_causal_and_a_full_call(checkpoint):
    cfg, tok = checkpoint.config, checkpoint.tokenizer
    cache = KVCache(cfg.llm.num_hidden_layers, cfg.llm.num_key_value_heads, cfg.llm.head_dim, 64, "cpu",
                    torch.float32, page_size=16)
    b = PackBuilder(cache)
    b.add_text([481, 5, 6, 482], EMPTY)
    b.add_image_block("vit", 3, EMPTY, tok.start_of_image_id, tok.end_of_image_id)
    b.add_text([481], EMPTY)  # a single row: causal and full attention coincide
    calls = b.build("cpu").varlen.calls
    assert [(c.causal, c.rows.tolist()) for c in calls] == [(True, [0, 1, 2, 3]),
                                                            (False, [4, 5, 6, 7, 8, 9])]
    assert calls[1].cu_seq_q.tolist() == [0, 5, 6] and calls[1].block_table.tolist() == [[1], [2]]


def test_attention_is_chosen_by_device_and_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, torch.float32).name == "sdpa"
    assert resolve_attention("auto", cuda, torch.float32).name == "sdpa"  # flash kernels: half precision only
    assert resolve_attention("auto", cuda, torch.bfloat16).name in ("varlen", "flash-attn")
    assert resolve_attention("varlen", cuda, torch.bfloat16).page_size == PAGE_SIZE
    with pytest.raises(InputError, match=r"attention: 'varlen' runs FlashAttention kernels, which need a CUDA "
                                         r"device and bfloat16 or float16 \(got cpu, float32\)"):
        resolve_attention("varlen", cpu, torch.float32)
    with pytest.raises(InputError, match=r"attention: 'dense' is not one of"):
        resolve_attention("dense", cpu, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["varlen", "flash-attn"])
def test_cuda_flash_kernels_equal_sdpa_in_bfloat16(golden_dir, mode):
    """The real kernels on the real paged layout: the mixed batch (forks, a think, an
    understanding) through varlen_attn / flash-attn against SDPA on the same GPU, in bf16."""
    from bagel.attention import has_flash_attn

    if mode == "flash-attn" and not has_flash_attn():
        pytest.skip("the flash extra is not installed")
    checkpoint = load_checkpoint(golden_dir, device="cuda", dtype=torch.bfloat16)
    consts = replace(checkpoint.config.constants, vae_min_px=64, vit_min_px=64)
    checkpoint = replace(checkpoint, config=replace(checkpoint.config, constants=consts))
    _, expected = Engine(checkpoint, attention="sdpa").run_traced(_mixed_requests(), record=True)
    engine = Engine(checkpoint, attention=mode)
    assert engine.attention.page_size == PAGE_SIZE
    _, got = engine.run_traced(_mixed_requests(), record=True)
    for want, have in zip(expected, got):
        if "final_latent" in want:
            rel = ((have["final_latent"] - want["final_latent"]).norm() / want["final_latent"].norm()).item()
            assert rel < 0.05, rel  # bf16 kernels with other summation orders over 3 steps


def test_torch_varlen_forms():
    """torch's varlen_attn changed between releases: 2.13 reads pages through block tables,
    2.11 takes contiguous keys (``window_size``, no block tables) and gets gathered keys; a form
    with neither (an ``is_causal`` flag only) is not used, so 'auto' falls back and 'varlen'
    says why."""
    from bagel.attention import has_torch_varlen, varlen_form

    def paged(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
              block_table=None):
        return q

    def contiguous(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        return q

    def causal_flag(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        return q

    assert [varlen_form(f) for f in (paged, contiguous, causal_flag)] == ["paged", "gather", None]
    assert has_torch_varlen()  # torch 2.13, which the tests run on


@torch.inference_mode()
def test_key_slots_read_a_forks_pages_in_order():
    """The gathered form reads each segment's keys through ``VarlenCall.key_slots``, built on
    the device from the block table: a fork's context pages, then its moved partial page and
    its own rows."""
    cache = KVCache(1, 1, 2, 128, "cpu", torch.float32, page_size=16)
    builder = PackBuilder(cache)
    ctx = builder.add_image_block("vit", 18, EMPTY, 0, 1)[0]  # 20 keys: pages 0 and 1 (4 keys)
    builder.build("cpu")
    builder = PackBuilder(cache)
    fork_a = builder.add_text([1, 2, 3], ctx)
    fork_b = builder.add_text([4, 5], ctx)
    call = builder.build("cpu").varlen.calls[0]
    # the first fork continues in place; the second moves the 4-key partial page to page 2
    assert fork_a.ranges == ((0, 23),) and fork_b.ranges == ((0, 16), (32, 38))
    assert call.total_k == 45 and call.key_slots.tolist() == [*range(0, 23), *range(0, 16), *range(32, 38)]
