"""The quality gate on the golden tiny checkpoint: yes/no questions about a generate or edit
request's own picture, asked in the same run.

A gate answer must equal the first-token probabilities an "understand" request gets for the
same pictures and question; it must follow the seed, leave the picture as it was, cost a fixed
number of forwards however many requests and questions share a run, and reuse an edit's input
picture from SigLIP's cache.
"""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bagel.attention import VarlenAttention
from bagel.config import GenerationParams
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.gate import answer_ids
from bagel.loading import load_checkpoint
from bagel.requests import GateAnswer, Request
from tests.test_engine_context import EncoderCalls
from tests.varlen_reference import make_reference

FAST = {"num_timesteps": 4}
QUESTIONS = ("Is there a red circle?", "Is the background blue?", "Is this a photograph?")
YES = ("Yes", "yes", " Yes", " yes")
NO = ("No", "no", " No", " no")


@pytest.fixture(scope="module")
def engine(golden_dir):
    """The golden checkpoint with the transforms' minimum sides lowered to 64 px (as
    ``test_engine_context.py`` does): 64-px pictures stay 64 px on both picture paths."""
    checkpoint = load_checkpoint(golden_dir, device="cpu", dtype=torch.float32)
    consts = replace(checkpoint.config.constants, vae_min_px=64, vit_min_px=64)
    return Engine(replace(checkpoint, config=replace(checkpoint.config, constants=consts)))


@pytest.fixture(scope="module")
def product():
    rng = np.random.default_rng(11)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def generate(prompt, seed, questions=QUESTIONS):
    return Request("generate", prompt, width=64, height=64, gate_questions=questions,
                   params=GenerationParams(seed=seed, **FAST))


def edit(picture, prompt, seed, questions=QUESTIONS):
    return Request("edit", prompt, images=[picture], context_seed=77, gate_questions=questions,
                   params=GenerationParams.for_task("edit", seed=seed, **FAST))


def first_ids(tokenizer):
    """The first token of each yes / no variant, a token that starts both left out."""
    yes = {tokenizer.encode(v)[0] for v in YES}
    no = {tokenizer.encode(v)[0] for v in NO}
    return sorted(yes - no), sorted(no - yes)


def pixels(result):
    return np.asarray(result.image, dtype=np.int16)


def test_the_tiny_tokenizer_answers_with_word_tokens_and_never_a_shared_space(engine):
    tok = engine.tokenizer
    yes, no = first_ids(tok)
    ids = answer_ids(tok)
    assert sorted(ids.yes) == yes and sorted(ids.no) == no
    # " Yes" and " No" both start with the space token in this small vocabulary: it says neither
    space = tok.encode(" ")[0]
    assert tok.encode(" Yes")[0] == tok.encode(" No")[0] == space
    assert space not in ids.yes + ids.no


@pytest.mark.parametrize("naive", [False, True])
def test_a_gate_answer_is_the_first_token_probability_of_the_same_understand_request(engine, product, naive):
    """A mixed run — one generation, one edit, both gated — against understand requests on
    the request's input pictures plus its result, with the question as prompt. Naive: one
    forward per context item and per answer (the pictures, the questions, the answers)."""
    requests = [generate("a red circle on blue", seed=3), edit(product, "make it red", seed=4)]
    results = engine.run(requests, naive=naive)
    if naive:
        assert [r.stats["run_gate_llm_forwards"] for r in results] == [1 + 3 + 3, 2 + 3 + 3]
    asks, expected_questions = [], []
    for request, result in zip(requests, results):
        assert [a.question for a in result.gate] == list(QUESTIONS)
        for question in QUESTIONS:
            asks.append(Request("understand", question, images=[*request.images, result.image],
                                params=GenerationParams(max_new_tokens=1, do_sample=False)))
            expected_questions.append(question)
    _, traces = engine.run_traced(asks, record=True)
    yes, no = first_ids(engine.tokenizer)
    answers = [a for r in results for a in r.gate]
    for k, (answer, trace) in enumerate(zip(answers, traces)):
        probs = torch.softmax(trace["step_logits"][0].float(), dim=-1)
        p_y, p_n = probs[yes].sum().item(), probs[no].sum().item()
        assert answer.question == expected_questions[k]
        assert abs(answer.yes_prob - p_y) <= 1e-6 and abs(answer.no_prob - p_n) <= 1e-6, (k, answer, p_y, p_n)
        assert abs(answer.p_yes - p_y / (p_y + p_n)) <= 1e-4, (k, answer.p_yes, p_y / (p_y + p_n))
        assert 0 < answer.yes_prob < 1 and 0 < answer.no_prob < 1
    assert len({round(a.p_yes, 6) for a in answers}) == len(answers)  # six contexts, six scores


def test_the_gate_follows_the_seed(engine):
    first, again, other = (engine.run([generate("a cat", seed=s)])[0] for s in (21, 21, 22))
    assert np.array_equal(pixels(first), pixels(again))
    assert first.gate == again.gate
    assert not np.array_equal(pixels(first), pixels(other))
    assert all(a.p_yes != b.p_yes for a, b in zip(first.gate, other.gate))


@pytest.mark.parametrize("task", ["generate", "edit"])
def test_many_gated_requests_cost_the_forwards_of_one_question(engine, product, task):
    """One packed prefill forward per context level (result picture, question; an edit's input
    picture first) and one decode forward, whatever the number of requests and questions."""
    def request(k, questions):
        if task == "generate":
            return generate(f"scene {k}", seed=30 + k, questions=questions)
        return edit(product, f"scene {k}", seed=30 + k, questions=questions)

    (one,) = engine.run([request(0, QUESTIONS[:1])])
    calls = EncoderCalls(engine)
    try:
        many = engine.run([request(k, QUESTIONS) for k in range(4)])
    finally:
        calls.close()
    levels = 3 if task == "edit" else 2
    assert one.stats["run_gate_llm_forwards"] == levels + 1
    assert {r.stats["run_gate_llm_forwards"] for r in many} == {levels + 1}
    ungated = engine.run([request(k, ()) for k in range(4)])
    assert many[0].stats["run_llm_forwards"] - ungated[0].stats["run_llm_forwards"] == levels + 1
    assert all(len(r.gate) == 3 for r in many)
    # SigLIP sees the product once (prefill of the edit, reused by the gate) and each result once
    inputs = 1 if task == "edit" else 0
    assert calls.vit == inputs + 4
    assert many[0].stats["run_context_encodes"] == inputs + 4


def test_the_gate_leaves_the_picture_as_it_was(engine, product):
    gated = [generate("a red circle", seed=12), edit(product, "make it red", seed=13)]
    plain = [replace(r, gate_questions=()) for r in gated]
    judged, judged_traces = engine.run_traced(gated, record=True)
    alone, alone_traces = engine.run_traced(plain, record=True)
    for k in range(2):
        assert torch.equal(judged_traces[k]["final_latent"], alone_traces[k]["final_latent"])
        assert np.array_equal(pixels(judged[k]), pixels(alone[k]))
        assert len(judged[k].gate) == 3 and alone[k].gate is None
    assert judged[0].stats["run_gate_llm_forwards"] > 0 and alone[0].stats["run_gate_llm_forwards"] == 0


def test_a_canceled_request_is_not_judged(engine):
    canceled, judged = engine.run([generate("a", seed=1), generate("b", seed=2)], should_cancel=lambda i: i == 0)
    assert canceled.canceled and canceled.gate is None
    assert [a.question for a in judged.gate] == list(QUESTIONS)
    assert all(isinstance(a, GateAnswer) for a in judged.gate)


def test_gate_questions_are_checked_at_the_edge(product):
    with pytest.raises(InputError, match="gate_questions: only a generate or edit request's picture can be judged"):
        Request("understand", "What is this?", images=[product], gate_questions=("Is it red?",))
    with pytest.raises(InputError, match=r"gate_questions\[1\]: must be a non-blank string"):
        generate("a", seed=1, questions=["Is it red?", "  "])
    with pytest.raises(InputError, match="gate_questions: 17 questions exceed the 16 question limit"):
        generate("a", seed=1, questions=[f"Is it {k}?" for k in range(17)])
    with pytest.raises(InputError, match="gate_questions: a list of question strings is required, got str"):
        generate("a", seed=1, questions="Is it red?")
    assert generate("a", seed=1, questions=["Is it red?"]).gate_questions == ("Is it red?",)


def test_the_memory_estimate_holds_the_gate_and_its_cache_never_grows(engine, product, caplog):
    """The run reserves the gate's KV slots up front (a growing cache copies itself, logged)."""
    gated = [edit(product, f"scene {k}", seed=50 + k) for k in range(3)] + [generate("a bag", seed=5)]
    plain = [replace(r, gate_questions=()) for r in gated]
    with_gate, without = engine.memory_estimate(gated), engine.memory_estimate(plain)
    assert with_gate.kv_cache > without.kv_cache and with_gate.forward > without.forward
    with caplog.at_level(logging.INFO, logger="bagel.kv_cache"):
        engine.run(gated)
    assert not [r.message for r in caplog.records if "kv cache grows" in r.message]


def test_the_paged_cache_path_gives_the_same_answers(engine, product):
    """The CUDA attention layout (pages, partial-page copies of forked contexts) on the CPU,
    through the reference kernel: the gate answers the SDPA path's."""
    requests = [generate("a red circle", seed=14), edit(product, "make it red", seed=15),
                edit(product, "make it blue", seed=16)]
    expected = engine.run(requests)
    try:
        paged = Engine(engine.checkpoint, attention=VarlenAttention(make_reference(min_page=16), name="reference",
                                                                     page_size=16))
        got = paged.run(requests)
    finally:
        engine.checkpoint.model.language_model.model.attention = engine.attention
    for want, have in zip(expected, got):
        for a, b in zip(want.gate, have.gate):
            assert abs(a.yes_prob - b.yes_prob) <= 1e-5 and abs(a.p_yes - b.p_yes) <= 1e-4, (a, b)
