"""`bagel bench` on the tiny preset: report schema and the work counts the algorithms imply.

No timing assertions: the figures are the benchmark's output, not a test's pass condition.
"""

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bagel.bench import BenchOptions, bench_checkpoint, checkpoint_folder, format_table, run_bench, scenario_requests
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.flops import attended_pairs, attention_flops, forward_flops, linear_flops_per_row
from bagel.loading import load_checkpoint
from bagel.sampler import branches_needed, make_schedule

STEPS = 3  # num_timesteps: two Euler steps
THINK_TOKENS = 4
TOP_KEYS = {"device", "size", "num_timesteps", "gemm_gflops", "results"}
ROW_KEYS = {"scenario", "naive_images_per_s", "optimised_images_per_s", "ratio", "naive_forwards_per_image",
            "optimised_forwards_per_image", "context_encodes", "loop_gflops", "peak_mem_bytes"}


@pytest.fixture(scope="module")
def options(tmp_path_factory) -> BenchOptions:
    return BenchOptions(size="tiny", device="cpu", scenarios=("tryon8", "think8"), steps=STEPS,
                        think_tokens=THINK_TOKENS, cache_dir=tmp_path_factory.mktemp("bench-cache"),
                        warm_up=False, gemm_min_seconds=0.05)


@pytest.fixture(scope="module")
def report(options) -> dict:
    return run_bench(options)


def _rows(report: dict) -> dict[str, dict]:
    return {row["scenario"]: row for row in report["results"]}


def _naive_loop_forwards(name: str) -> int:
    """One forward per request, step and CFG branch: what one-at-a-time sampling must run."""
    total = 0
    for req in scenario_requests(name, image_px=64, steps=STEPS, think_tokens=THINK_TOKENS,
                                 latent_shape=(16, 8, 8)):
        p = req.params
        schedule = make_schedule(p.num_timesteps, p.timestep_shift, p.cfg_interval)
        has_img_branch = req.task == "edit" or req.think
        for on in schedule.cfg_on:
            text, img = branches_needed(on, p.cfg_text_scale, p.cfg_img_scale)
            total += 1 + text + (img and has_img_branch)
    return total


def test_report_has_the_issue_schema_and_survives_json(report, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    loaded = json.loads(path.read_text())
    assert TOP_KEYS <= loaded.keys()
    assert loaded["size"] == "tiny" and loaded["num_timesteps"] == STEPS
    assert loaded["device"].startswith("cpu") and loaded["gemm_gflops"] > 0
    assert [row["scenario"] for row in loaded["results"]] == ["tryon8", "think8"]
    for row in loaded["results"]:
        assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
        assert row["images"] == 8
        assert row["naive_images_per_s"] > 0 and row["optimised_images_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["optimised_images_per_s"] / row["naive_images_per_s"])
        assert row["peak_mem_bytes"] > 0 and row["loop_gflops"] > 0 and row["loop_flops"] > 0


def test_naive_runs_one_forward_per_request_step_and_cfg_branch(report):
    rows = _rows(report)
    tryon = rows["tryon8"]
    # edit defaults: CFG on at every step, text and image branches → 3 forwards per step and image
    assert tryon["naive_forwards"]["loop"] == _naive_loop_forwards("tryon8") == 8 * (STEPS - 1) * 3
    assert rows["think8"]["naive_forwards"]["loop"] == _naive_loop_forwards("think8")


def test_optimised_runs_one_forward_per_step_for_the_whole_batch(report):
    for row in report["results"]:
        assert row["optimised_forwards"]["loop"] == STEPS - 1, row["scenario"]
        assert row["optimised_forwards_per_image"] < row["naive_forwards_per_image"]
        assert row["loop_rows_per_forward"] > 0


def test_tryon8_encodes_the_product_once_in_the_optimised_path(report):
    tryon = _rows(report)["tryon8"]
    assert tryon["context_encodes"] == 1
    assert tryon["vae_encodes"] == {"naive": 8, "optimised": 1}
    assert tryon["vit_encodes"] == {"naive": 8, "optimised": 1}
    assert tryon["naive_context_encodes"] == 8


def test_think_streams_are_decoded_together(report):
    think = _rows(report)["think8"]
    assert think["context_encodes"] == 0
    # batched: one decode forward per token position for all 8 streams; naive: one per stream and token
    assert 1 <= think["optimised_forwards"]["decode"] <= THINK_TOKENS + 1
    assert think["naive_forwards"]["decode"] >= 8


def test_time_is_split_by_phase_and_both_modes_do_the_same_denoising_arithmetic(report):
    rows = _rows(report)
    for row in rows.values():
        for mode, ips in (("naive", row["naive_images_per_s"]), ("optimised", row["optimised_images_per_s"])):
            split = row["phase_seconds_per_image"][mode]
            assert set(split) == {"encode", "prefill", "think", "denoise", "vae_decode", "other"}
            assert all(v >= 0 for v in split.values())
            assert sum(split.values()) == pytest.approx(1 / ips, rel=1e-6), (row["scenario"], mode)
            assert split["denoise"] > 0 and split["vae_decode"] > 0 and split["prefill"] > 0
        # batching regroups the denoising forwards; it does not change their arithmetic
        assert row["naive_loop_flops"] == row["loop_flops"], row["scenario"]
    assert rows["tryon8"]["phase_seconds_per_image"]["naive"]["encode"] > 0
    assert rows["think8"]["phase_seconds_per_image"]["naive"]["think"] > 0
    assert rows["think8"]["phase_seconds_per_image"]["naive"]["encode"] == 0


def test_naive_and_optimised_outputs_agree(report):
    for row in report["results"]:
        assert row["max_pixel_diff"] is not None and row["max_pixel_diff"] <= 8, row["scenario"]


def test_table_states_the_conditions_and_every_scenario(report):
    table = format_table(report)
    assert f"num_timesteps={STEPS}" in table and "size tiny" in table
    assert "tryon8" in table and "think8" in table and "GEMM" in table
    assert "by phase" in table and "vae_decode" in table


def test_taylorseer_scenarios_count_what_the_step_cache_saves(options):
    """tryon8_taylorseer against the exact naive baseline over 12 timesteps (11 steps, all three
    CFG branches every step): each branch is computed at steps 0-4, 7 and 10 and predicted at the
    4 others, so the loop does 7/11 of the naive arithmetic."""
    report = run_bench(replace(options, scenarios=("tryon8_taylorseer",), taylorseer_steps=12))
    (row,) = report["results"]
    assert row["scenario"] == "tryon8_taylorseer" and row["num_timesteps"] == 12 == report["taylorseer_steps"]
    assert row["blocks_per_image"] == {"naive": {"full": 33, "cached": 0}, "optimised": {"full": 21, "cached": 12}}
    assert row["naive_forwards"]["loop"] == 8 * 11 * 3  # the exact one-at-a-time baseline
    assert row["optimised_forwards"]["loop"] == 7
    assert row["loop_flops_vs_naive"] == pytest.approx(row["loop_flops"] / row["naive_loop_flops"])
    assert 7 / 11 * 0.95 < row["loop_flops_vs_naive"] < 7 / 11 * 1.05
    assert row["context_encodes"] == 1 and row["max_pixel_diff"] is not None
    table = format_table(report)
    assert "tryon8_taylorseer" in table and "21/12" in table and "(12 for *_taylorseer)" in table


@pytest.mark.parametrize("kwargs, message", [
    ({"size": "huge"}, "size: 'huge' is not one of"),
    ({"scenarios": ("tryon9",)}, "scenarios: ['tryon9'] given, choose from"),
    ({"steps": 1}, "steps: 1 is outside the allowed range 2..1000"),
    ({"taylorseer_steps": 1}, "taylorseer_steps: 1 is outside the allowed range 2..1000"),
])
def test_bad_options_are_refused_with_field_and_limit(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BenchOptions(**kwargs)


def test_flop_model_matches_torch_counted_matmuls_of_a_real_loop_forward(options):
    """The linear part of ``forward_flops`` equals what torch's FlopCounterMode counts for the
    matmuls of one real denoising forward; attention adds 4·pairs·H·D per layer on top."""
    checkpoint = bench_checkpoint(load_checkpoint(checkpoint_folder(options), device="cpu", dtype=torch.float32), 64)
    cfg = checkpoint.config.llm
    lm = checkpoint.model.language_model
    seen = []

    def pre(module, args):
        batch = args[1]
        if not seen and any(seg.write_start is None for seg in batch.segments):
            counter = FlopCounterMode(display=False)
            counter.__enter__()
            seen.append((batch, counter))

    def post(module, args, output):
        if len(seen) == 1:
            seen[0][1].__exit__(None, None, None)
            seen.append(None)

    handles = [lm.register_forward_pre_hook(pre), lm.register_forward_hook(post)]
    try:
        request = scenario_requests("t2i1", image_px=64, steps=2, think_tokens=1, latent_shape=(16, 8, 8))
        Engine(checkpoint).run(request)
    finally:
        for handle in handles:
            handle.remove()
    batch, counter = seen[0]
    per_op = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in per_op.items() if str(op).split(".")[1] in ("mm", "addmm"))
    assert matmuls == batch.length * linear_flops_per_row(cfg)
    pairs = sum(attended_pairs(seg.query_len, seg.past.length, seg.is_causal) for seg in batch.segments)
    assert pairs > batch.length  # the query block really attends to the picture context
    assert forward_flops(cfg, batch) == matmuls + attention_flops(cfg, pairs)
