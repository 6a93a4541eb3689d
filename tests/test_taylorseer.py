"""TaylorSeer step caching: the per-branch schedule against the reference's own record, the
factor recursion, batched against one-at-a-time, fresh state on every run, and what it saves.
(The three golden cases themselves run in ``test_engine_parity.py``.)"""

import json

import pytest
import torch

from bagel.config import GenerationParams
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.loading import load_checkpoint
from bagel.requests import Request
from bagel.taylorseer import TaylorSettings, TaylorState, branch_schedule, factor_count_after

CASES = ("t2i_taylorseer", "edit_taylorseer", "t2i_think_taylorseer")
BRANCHES = ("cond", "text_uncond", "img_uncond")


@pytest.fixture(scope="module")
def engine(golden_dir):
    return Engine(load_checkpoint(golden_dir, device="cpu", dtype=torch.float32))


@pytest.fixture(scope="module")
def recorded(golden_dir):
    cases = json.loads((golden_dir / "golden" / "cases.json").read_text())["cases"]
    return {c["id"]: c["expected"]["taylorseer_schedule"] for c in cases if c["id"] in CASES}


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("branch", BRANCHES)
def test_branch_schedule_matches_the_reference_record(recorded, case_id, branch):
    """Everything the reference's own bookkeeping recorded per branch: which steps it evaluated
    and computed in full, the counters, the factors kept and the Taylor distances used."""
    rec = recorded[case_id][branch]
    steps = len(recorded[case_id]["cond"]["evaluated_steps"])
    plan = branch_schedule([s in rec["evaluated_steps"] for s in range(steps)], TaylorSettings())
    assert [s for s, f in enumerate(plan) if f is True] == rec["full_steps"]
    assert [s for s, f in enumerate(plan) if f is False] == rec["taylor_steps"]
    counters = {step: n for n, step in enumerate(rec["evaluated_steps"])}
    assert [counters[s] for s in rec["evaluated_steps"]] == rec["branch_counter_at_evaluated_steps"]
    full_n = [counters[s] for s in rec["full_steps"]]
    assert factor_count_after(full_n, TaylorSettings()) == rec["factors_stored_after_each_full_step"]
    state = TaylorState(TaylorSettings())
    used, xs = [], []
    for step in rec["evaluated_steps"]:
        if step in rec["full_steps"]:
            state.record_full(torch.full((1, 1), float(step)))
        else:
            used.append(len(state.factors))
            xs.append(state.n - state.last_full)
            state.predict()
    assert used == rec["taylor_factors_used"] and xs == rec["taylor_x"]


def test_factor_recursion_divides_differences_by_the_distance():
    """The reference's recursion, by hand for y = n² (full at 0-4, 7, 10): each order is the
    difference of the previous order's last two values divided by their distance in
    evaluations (no factorial); a line is predicted exactly."""
    settings = TaylorSettings()
    square, line = TaylorState(settings), TaylorState(settings)
    for n, full in enumerate(branch_schedule([True] * 12, settings)):
        if full:
            square.record_full(torch.tensor([[float(n * n)]]))
            line.record_full(torch.tensor([[3.0 * n + 1]]))
            if n == 4:
                assert [f.item() for f in square.factors] == [16.0, 7.0]  # (16 - 9) / 1
            if n == 7:  # D1 = (49 − 16)/3, D2 = (11 − 7)/3
                assert [f.item() for f in square.factors] == pytest.approx([49.0, 11.0, 4 / 3])
            if n == 10:  # D3 = (2 − 4/3)/3: the spacing changed from 1 to 3
                assert [f.item() for f in square.factors] == pytest.approx([100.0, 17.0, 2.0, 2 / 9])
        else:
            predicted = line.predict()
            assert predicted.item() == pytest.approx(3.0 * n + 1)
            guess = square.predict()
            x = n - square.last_full
            expected = sum(f.item() * x ** i / [1, 1, 2, 6, 24][i] for i, f in enumerate(square.factors))
            assert guess.item() == pytest.approx(expected)


def _params(**kw):
    return GenerationParams(num_timesteps=14, taylorseer=True, **kw)


def test_batched_equals_one_at_a_time_with_taylorseer(engine):
    """Three generations in one run, each with its own Taylor state per branch (one of them
    switches guidance off half-way, so its branches evaluate on other steps), against each
    alone in naive mode: equal within the TaylorSeer parity tolerance."""
    requests = [Request("generate", "a red bag", width=32, height=32, params=_params(seed=1)),
                Request("generate", "a blue hat", width=48, height=32, params=_params(seed=2, cfg_interval=(0.5, 1))),
                Request("generate", "green shoes", think=True, width=32, height=32,
                        params=_params(seed=3, cfg_img_scale=1.5, max_think_tokens=8))]
    batched, traces = engine.run_traced(requests, record=True)
    alone, alone_traces = engine.run_traced(requests, record=True, naive=True)
    for k, (a, b) in enumerate(zip(traces, alone_traces)):
        diff = (a["final_latent"] - b["final_latent"]).abs().max().item()
        assert diff <= 1e-3, f"request {k}: {diff:.3g}"
    assert batched[2].think_text == alone[2].think_text
    for b, a in zip(batched, alone):  # each request keeps its own schedule in the batch
        assert (b.stats["denoise_blocks_full"], b.stats["denoise_blocks_cached"]) == \
            (a.stats["denoise_blocks_full"], a.stats["denoise_blocks_cached"])
        assert b.stats["denoise_blocks_cached"] > 0


def test_every_run_starts_with_fresh_state(engine, golden_dir):
    """The reference leaks TaylorSeer state into the next call of its process; here a run after
    a TaylorSeer run, with or without it, equals the same run in a fresh engine."""
    plain = Request("generate", "a red bag", width=32, height=32, params=GenerationParams(num_timesteps=8, seed=9))
    cached = Request("generate", "a red bag", width=32, height=32, params=_params(seed=9))
    fresh = Engine(load_checkpoint(golden_dir, device="cpu", dtype=torch.float32))
    (want_plain,), _ = fresh.run_traced([plain], record=True)
    (want_cached,), want_cached_tr = fresh.run_traced([cached], record=True)
    engine.run([cached])
    _, got_plain_tr = engine.run_traced([plain], record=True)
    _, got_cached_tr = engine.run_traced([cached], record=True)
    _, got_cached_again = engine.run_traced([cached], record=True)
    _, want_plain_tr = fresh.run_traced([plain], record=True)
    assert torch.equal(got_plain_tr[0]["final_latent"], want_plain_tr[0]["final_latent"])
    assert torch.equal(got_cached_tr[0]["final_latent"], want_cached_tr[0]["final_latent"])
    assert torch.equal(got_cached_again[0]["final_latent"], want_cached_tr[0]["final_latent"])


def test_taylorseer_predicts_steps_instead_of_computing_them(engine):
    params = dict(num_timesteps=21, seed=4)
    request = Request("generate", "a red bag", width=32, height=32, params=GenerationParams(**params))
    (exact,) = engine.run([request])
    cached_request = Request("generate", "a red bag", width=32, height=32,
                             params=GenerationParams(taylorseer=True, **params))
    (cached,) = engine.run([cached_request])
    # 20 steps, guidance on for the first 17 (t > 0.4): cond full at 0-4, 7, 10, 13, 16, 19
    # (10 of 20), text-free full at 0-4, 7, 10, 13, 16 (9 of 17)
    assert (exact.stats["denoise_blocks_full"], exact.stats["denoise_blocks_cached"]) == (37, 0)
    assert (cached.stats["denoise_blocks_full"], cached.stats["denoise_blocks_cached"]) == (19, 18)
    assert cached.stats["run_denoise_forward_tokens"] < 0.6 * exact.stats["run_denoise_forward_tokens"]


def test_memory_estimate_counts_the_taylor_factors(engine):
    def estimate(**kw):
        return engine.memory_estimate([Request("generate", "a", width=64, height=64,
                                               params=GenerationParams(num_timesteps=8, **kw))])

    off, on = estimate(), estimate(taylorseer=True)
    rows = (64 // 16) * (64 // 16)
    assert off.taylor_factors == 0
    assert on.taylor_factors == 7 * rows * 2 * engine.config.llm.hidden_size * 4  # 7 factors, 2 branches
    assert on.total - off.total == on.taylor_factors


def test_taylorseer_parameters_are_checked():
    with pytest.raises(InputError, match=r"taylorseer_interval: 0 is outside the allowed range 1..100"):
        GenerationParams(taylorseer=True, taylorseer_interval=0)
    with pytest.raises(InputError, match=r"taylorseer: 'yes' is outside the allowed range true or false"):
        GenerationParams(taylorseer="yes")
