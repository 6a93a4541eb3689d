"""Interleaved requests and saved contexts on the golden tiny checkpoint: the fixed tasks as
interleaved requests, a session's turns against the recorded golden (tests/data/interleaved),
a turn started from the previous turn's saved context (SDPA and the paged varlen layout), and
the checks on parts and contexts."""

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel.attention import SdpaAttention, VarlenAttention
from bagel.config import GenerationParams
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.loading import load_checkpoint
from bagel.requests import (
    ImagePart,
    InterleavedRequest,
    Request,
    TextPart,
    picture_noise_seed,
)
from tests.varlen_reference import make_reference

GOLDEN = Path(__file__).resolve().parent / "data" / "interleaved"
FAST = {"num_timesteps": 3, "max_think_tokens": 4, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "golden.json").read_text())


@pytest.fixture(scope="module")
def engine(golden_dir, golden):
    """The golden checkpoint with the transforms' minimum sides lowered as the golden states."""
    checkpoint = load_checkpoint(golden_dir, device="cpu", dtype=torch.float32)
    consts = replace(checkpoint.config.constants, **golden["constants_override"])
    return Engine(replace(checkpoint, config=replace(checkpoint.config, constants=consts)))


def _load(name):
    img = Image.open(GOLDEN / name)
    img.load()
    return img


@pytest.fixture(scope="module")
def pictures(golden):
    loaded = {name: _load(name) for name in golden["pictures"]}
    for name, img in loaded.items():
        digest = hashlib.sha256(np.asarray(img.convert("RGB"), dtype=np.uint8).tobytes()).hexdigest()
        assert digest == golden["pictures"][name]["pixels_sha256"], f"{name} is not the recorded picture"
    return loaded


def turn(golden, pictures, k, **changes):
    spec = golden["turns"][k]
    parts = [TextPart(p["text"]) if "text" in p else ImagePart(pictures[p["image"]]) for p in spec["parts"]]
    request = InterleavedRequest(parts, output=spec["output"], params=GenerationParams(**spec["params"]))
    return replace(request, **changes)


def pixels(result):
    return np.asarray(result.image, dtype=np.int16)


def max_diff(a, b):
    return int(np.abs(pixels(a) - pixels(b)).max())


class EncoderCalls:
    """Pictures through the VAE encoder and SigLIP, counted with forward pre-hooks."""

    def __init__(self, engine):
        self.vae = self.vit = 0
        self._handles = [engine.vae.encoder.register_forward_pre_hook(self._on_vae),
                         engine.model.vit_model.register_forward_pre_hook(self._on_vit)]

    def _on_vae(self, module, args):
        self.vae += int(args[0].shape[0])

    def _on_vit(self, module, args):
        self.vit += int(args[2].numel()) - 1

    def close(self):
        for h in self._handles:
            h.remove()


# ---- the fixed tasks as interleaved requests --------------------------------------------------

@pytest.mark.parametrize("think", [False, True])
def test_picture_then_instruction_is_the_edit_task(engine, pictures, think):
    picture = pictures["input.png"]
    params = GenerationParams.for_task("edit", seed=21, **FAST)
    (mine,), (mine_trace,) = engine.run_traced([InterleavedRequest(
        [ImagePart(picture, noise_seed=77), TextPart("make it red")], output="image", think=think, params=params)],
        record=True)
    (edit,), (edit_trace,) = engine.run_traced([Request("edit", "make it red", images=[picture], think=think,
                                                        context_seed=77, params=params)], record=True)
    assert mine.image.size == edit.image.size == (80, 64)
    assert torch.equal(mine_trace["final_latent"], edit_trace["final_latent"])
    assert mine.think_text == edit.think_text
    # without a noise_seed the picture's own seed: the same latent in any request
    (derived,) = engine.run([InterleavedRequest([ImagePart(picture), TextPart("make it red")], output="image",
                                                think=think, params=params)])
    (seeded,) = engine.run([Request("edit", "make it red", images=[picture], think=think,
                                    context_seed=picture_noise_seed(picture), params=params)])
    assert np.array_equal(pixels(derived), pixels(seeded))


@pytest.mark.parametrize("think", [False, True])
def test_picture_then_question_is_the_understand_task(engine, pictures, think):
    picture = pictures["input.png"]
    params = GenerationParams(seed=3, max_new_tokens=10)
    (mine,), (mine_trace,) = engine.run_traced([InterleavedRequest(
        [ImagePart(picture, generate=False), TextPart("What is it?")], output="text", think=think, params=params)],
        record=True)
    (task,), (task_trace,) = engine.run_traced([Request("understand", "What is it?", images=[picture], think=think,
                                                        params=params)], record=True)
    assert (mine.text, mine.think_text) == (task.text, task.think_text) and mine.image is None
    assert torch.equal(mine_trace["step_logits"], task_trace["step_logits"])


@pytest.mark.parametrize("think", [False, True])
def test_a_lone_prompt_is_the_generate_task(engine, think):
    params = GenerationParams(seed=5, **FAST)
    (mine,), (mine_trace,) = engine.run_traced([InterleavedRequest(
        [TextPart("a red circle")], output="image", think=think, width=32, height=48, params=params)], record=True)
    (task,), (task_trace,) = engine.run_traced([Request("generate", "a red circle", think=think, width=32, height=48,
                                                        params=params)], record=True)
    assert mine.image.size == (32, 48)
    assert torch.equal(mine_trace["final_latent"], task_trace["final_latent"])
    assert mine.think_text == task.think_text


def test_output_size_follows_the_last_vae_encoded_picture(engine, pictures):
    params = GenerationParams(seed=5, num_timesteps=2)
    wide = pictures["input.png"].resize((96, 48))
    sized = engine.run([
        InterleavedRequest([ImagePart(pictures["input.png"]), ImagePart(wide), TextPart("a")], output="image",
                           width=32, height=32, params=params),
        InterleavedRequest([ImagePart(wide), ImagePart(pictures["input.png"], generate=False), TextPart("a")],
                           output="image", width=32, height=32, params=params),
        InterleavedRequest([ImagePart(wide, generate=False), TextPart("a")], output="image", width=32, height=32,
                           params=params),
    ])
    assert [r.image.size for r in sized] == [(128, 64), (128, 64), (32, 32)]


# ---- a session --------------------------------------------------------------------------------

def test_the_session_golden_turn_by_turn(engine, golden, pictures):
    first, third = (engine.run([turn(golden, pictures, k)])[0] for k in (0, 2))
    assert first.text == golden["turns"][0]["expected"]["text"]
    assert third.text == golden["turns"][2]["expected"]["text"]
    (second,) = engine.run([turn(golden, pictures, 1)])
    expected = golden["turns"][1]["expected"]
    assert list(second.image.size) == expected["size"]
    diff = np.abs(pixels(second) - np.asarray(pictures[expected["image"]], dtype=np.int16))
    assert diff.max() <= 2, f"turn 2 pixels differ by up to {diff.max()} levels (mean {diff.mean():.3f})"


def test_a_multi_turn_request_is_deterministic_for_a_seed(engine, pictures):
    def request(seed):
        return InterleavedRequest([TextPart("You paint."), ImagePart(pictures["input.png"]), TextPart("it is a hill"),
                                   TextPart("paint it at night")], output="image",
                                  params=GenerationParams.for_task("edit", seed=seed, **FAST))

    a, b, c = engine.run([request(1), request(1), request(2)])
    (alone,) = engine.run([request(1)])
    (naive,) = engine.run([request(1)], naive=True)  # one forward per item, step and branch
    assert np.array_equal(pixels(a), pixels(b)) and max_diff(a, alone) <= 1 and max_diff(a, naive) <= 1
    assert not np.array_equal(pixels(a), pixels(c))  # the picture's latent is shared, the initial noise is not


def test_a_mixed_batch_equals_each_request_alone(engine, pictures):
    picture = pictures["input.png"]
    edit = GenerationParams.for_task("edit", seed=9, **FAST)
    requests = [
        Request("edit", "make it blue", images=[picture], context_seed=4, params=edit),
        InterleavedRequest([ImagePart(picture, noise_seed=4), TextPart("make it"), TextPart("green")],
                           output="image", params=edit),
        InterleavedRequest([TextPart("look"), ImagePart(picture), TextPart("what is it?")], output="text",
                           think=True, params=GenerationParams(seed=2, **FAST)),
        Request("understand", "what is it?", images=[picture], params=GenerationParams(seed=2, **FAST)),
    ]
    calls = EncoderCalls(engine)
    try:
        batched = engine.run(requests)
    finally:
        calls.close()
    assert calls.vae == 1 and calls.vit == 1  # one picture, one noise seed: one encode of each kind
    for request, got in zip(requests, batched):
        (alone,) = engine.run([request])
        assert got.text == alone.text and got.think_text == alone.think_text
        if alone.image is not None:
            assert max_diff(got, alone) <= 1


# ---- saved contexts ---------------------------------------------------------------------------

def test_turn_3_from_turn_1s_saved_context_answers_the_same_with_fewer_rows(engine, golden, pictures):
    (first,) = engine.run([turn(golden, pictures, 0)], keep_contexts=True)
    saved = first.context
    assert saved is not None and saved.rows > 0 and saved.keys.shape[1] == saved.rows
    assert saved.nbytes == 2 * saved.keys.numel() * 4 and len(saved.parts) == 3
    (plain,) = engine.run([turn(golden, pictures, 2)])
    calls = EncoderCalls(engine)
    try:
        (reused,) = engine.run([turn(golden, pictures, 2)], contexts=[saved])
    finally:
        calls.close()
    assert reused.text == plain.text == golden["turns"][2]["expected"]["text"]
    assert reused.stats["context_reused_parts"] == 3 and reused.stats["prefill_rows_saved"] == saved.rows
    assert reused.stats["run_prefill_rows"] == plain.stats["run_prefill_rows"] - saved.rows
    assert plain.stats["prefill_rows_saved"] == 0 and plain.context is None
    assert calls.vit == 1  # only turn 2's picture: the input picture's rows came with the context


def _turn_4(golden, pictures):
    """Turn 2's parts, its picture and another instruction: an image output again."""
    request = turn(golden, pictures, 1)
    return replace(request, parts=(*request.parts, ImagePart(pictures["turn2.png"]), TextPart("Now make it night.")))


def test_an_image_turn_from_the_previous_image_turns_context_paints_the_same(engine, golden, pictures):
    (second,) = engine.run([turn(golden, pictures, 1)], keep_contexts=True)
    (plain,) = engine.run([_turn_4(golden, pictures)])
    calls = EncoderCalls(engine)
    try:
        (reused,) = engine.run([_turn_4(golden, pictures)], contexts=[second.context])
    finally:
        calls.close()
    assert max_diff(plain, reused) <= 1
    assert reused.stats["context_reused_parts"] == 5 and reused.stats["prefill_rows_saved"] > 0
    assert reused.stats["run_prefill_rows"] < plain.stats["run_prefill_rows"]
    assert (calls.vae, calls.vit) == (1, 1)  # only the new picture is encoded


def test_the_paged_cache_reads_and_keeps_contexts(engine, golden, pictures):
    """The CUDA layout on the CPU (pages of 16 slots, the reference kernel checking the varlen
    contract): an imported context is a page-aligned range whose forks move partial pages, and
    a context kept there holds the keys the SDPA path keeps."""
    (sdpa,) = engine.run([turn(golden, pictures, 1)], keep_contexts=True)
    (expected,) = engine.run([_turn_4(golden, pictures)])
    try:
        paged = Engine(engine.checkpoint, attention=VarlenAttention(make_reference(min_page=16), name="reference",
                                                                     page_size=16))
        (reused,) = paged.run([_turn_4(golden, pictures)], contexts=[sdpa.context])
        (kept,) = paged.run([turn(golden, pictures, 1)], keep_contexts=True)
    finally:
        engine.checkpoint.model.language_model.model.attention = SdpaAttention()
    assert reused.stats["context_reused_parts"] == 5 and max_diff(reused, expected) <= 1
    assert kept.context.ends == sdpa.context.ends and kept.context.path == sdpa.context.path
    torch.testing.assert_close(kept.context.keys, sdpa.context.keys, atol=1e-4, rtol=1e-4)
    (back,) = engine.run([_turn_4(golden, pictures)], contexts=[kept.context])
    assert back.stats["context_reused_parts"] == 5 and max_diff(back, expected) <= 1


def test_a_context_is_reused_as_far_as_it_agrees_and_no_further(engine, golden, pictures):
    (first,) = engine.run([turn(golden, pictures, 0)], keep_contexts=True)
    (plain,) = engine.run([turn(golden, pictures, 1)])
    # turn 1 read its picture through SigLIP only, an image turn reads it through both blocks:
    # only the system text before it is shared
    (partly,) = engine.run([turn(golden, pictures, 1)], contexts=[first.context])
    assert partly.stats["context_reused_parts"] == 1 and partly.stats["prefill_rows_saved"] == first.context.ends[0][0]
    assert max_diff(partly, plain) <= 1
    # a context longer than the request: the request's parts are all in it
    (third,) = engine.run([turn(golden, pictures, 2)], keep_contexts=True)
    (again,) = engine.run([turn(golden, pictures, 0)], contexts=[third.context])
    assert again.stats["context_reused_parts"] == 3 and again.text == golden["turns"][0]["expected"]["text"]
    # nothing shared: another first text, think on (its system prompt comes first), other transforms
    request = turn(golden, pictures, 2)
    consts = replace(engine.config.constants, vit_min_px=128)
    resized = Engine(replace(engine.checkpoint, config=replace(engine.config, constants=consts)))
    for runner, other in ((engine, replace(request, parts=(TextPart("You are a sculptor."), *request.parts[1:]))),
                          (engine, replace(request, think=True)), (resized, request)):
        (result,) = runner.run([other], contexts=[first.context])
        assert result.stats["context_reused_parts"] == 0 and result.stats["prefill_rows_saved"] == 0
    # a fixed-task request neither keeps nor reads one
    (task,) = engine.run([Request("generate", "a", width=32, height=32, params=GenerationParams(seed=1, **FAST))],
                         contexts=[first.context], keep_contexts=True)
    assert task.context is None and task.stats["context_reused_parts"] == 0


def test_contexts_are_checked(engine, golden, pictures):
    request = turn(golden, pictures, 0)
    with pytest.raises(InputError, match=r"contexts: 2 given for 1 requests; one SavedContext or None per request"):
        engine.run([request], contexts=[None, None])
    with pytest.raises(InputError, match=r"contexts\[0\]: a SavedContext or None is required, got dict"):
        engine.run([request], contexts=[{}])


def test_the_memory_estimate_counts_every_picture_and_kept_contexts(engine, golden, pictures, caplog):
    one = turn(golden, pictures, 1)
    two = replace(one, parts=(*one.parts, ImagePart(pictures["turn2.png"]), TextPart("again")))
    base, more = engine.memory_estimate([one]), engine.memory_estimate([two])
    assert more.kv_cache > base.kv_cache and base.saved_contexts == 0
    kept = engine.memory_estimate([one], keep_contexts=True)
    (result,) = engine.run([one], keep_contexts=True)
    assert kept.saved_contexts == result.context.nbytes and "saved contexts" in kept.describe()
    with caplog.at_level(logging.INFO, logger="bagel.kv_cache"):
        engine.run([two, one], contexts=[result.context, result.context], keep_contexts=True)
    assert not [r.message for r in caplog.records if "kv cache grows" in r.message]


# ---- checks -----------------------------------------------------------------------------------

def test_parts_are_checked_without_the_model(pictures):
    picture, text = pictures["input.png"], TextPart("a")
    cases = [
        ([], "text", {}, r"parts: a non-empty list of TextPart and ImagePart is required"),
        ([text], "video", {}, r"output: 'video' is not one of \('text', 'image'\)"),
        ([ImagePart(picture)], "image", {}, r"parts: at least one TextPart is required, got 1 pictures and no text"),
        ([text, "b"], "text", {}, r"parts\[1\]: a TextPart or ImagePart is required, got str"),
        ([text, TextPart(" ")], "text", {}, r"parts\[1\]\.text: must be a non-empty string"),
        ([TextPart("x" * 8001)], "text", {}, r"parts\[0\]\.text: 8001 characters exceeds the 8000 limit"),
        ([text, ImagePart(b"png")], "text", {}, r"parts\[1\]\.image: a decoded PIL picture is required, got bytes"),
        ([ImagePart(picture, understand=False, generate=False), text], "image", {},
         r"parts\[0\]: understand and generate are both false, so the picture is in no context"),
        ([ImagePart(picture, understand=False), text], "text", {},
         r"parts\[0\]\.understand: false, but a text output reads a picture only through its ViT block"),
        ([ImagePart(picture, noise_seed=-1), text], "image", {},
         r"parts\[0\]\.noise_seed: -1 must be an integer in 0\.\.2\^63-1"),
        ([text], "text", {"init_noise": torch.zeros(4, 64)}, r"init_noise: a text output generates no picture"),
    ]
    for parts, output, extra, message in cases:
        with pytest.raises(InputError, match=message):
            InterleavedRequest(parts, output=output, **extra)
    assert isinstance(InterleavedRequest([text], output="text").parts, tuple)


def test_the_engine_checks_sizes_noise_and_length(engine):
    with pytest.raises(InputError, match=r"requests\[1\]\.width: 5000 px exceeds the 1024 px maximum side"):
        engine.run([InterleavedRequest([TextPart("a")], output="text"),
                    InterleavedRequest([TextPart("a")], output="image", width=5000)])
    with pytest.raises(InputError, match=r"requests\[0\]\.init_noise: shape \(3, 64\) given, expected \(6, 64\) "
                                         r"for a 32x48 px output"):
        engine.run([InterleavedRequest([TextPart("a")], output="image", width=32, height=48,
                                       init_noise=torch.zeros(3, 64))])
    long_text = [TextPart("word " * 1500)] * 8
    with pytest.raises(InputError, match=r"requests\[0\]\.parts: \d+ positions \(\+0 think tokens\) exceed the "
                                         r"\d+-position context of the model"):
        engine.run([InterleavedRequest(long_text, output="text")])
    with pytest.raises(InputError, match=r"requests\[0\]: a bagel.requests.Request or InterleavedRequest is "
                                         r"required, got TextPart"):
        engine.run([TextPart("a")])
