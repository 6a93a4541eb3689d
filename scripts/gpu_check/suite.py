"""The checks of ``gpu-check`` in the order they run, each with its planned cost.

Owns: the order (the issue's: versions, attention, loads, outputs, syncs, batched vs naive,
try-on memory, OOM recovery, CPU offload, then the timings), the names ``--only`` accepts, and
each check's planned seconds — priced by ``plan.Costs`` from the work the check does, so a plan
follows the size and the rates measured so far. The loads run int8, nf4, then bf16, so the bf16
engine the next checks use stays loaded; the offload check and the nf4 timings load nf4 again
(planned). Leaves running them to ``runner.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from gpu_check import scenarios
from gpu_check.attention_check import check_attention
from gpu_check.model_checks import (SYNC_STEPS, check_batched_vs_naive, check_load, check_loop_syncs,
                                    check_outputs, check_tryon_memory, check_versions)
from gpu_check.offload_check import check_offload
from gpu_check.offload_check import planned_seconds as offload_s
from gpu_check.oom_check import INJECTED_JOBS, REAL_JOBS, STEPS, check_oom_bisection
from gpu_check.plan import requests_work
from gpu_check.record import Record
from gpu_check.session import Session
from gpu_check.timings import ORDER, timing_name, timing_steps

LOADS = (("load_int8", "int8"), ("load_nf4", "nf4"), ("load_bf16", "none"))
CHECKS = ("versions", "attention", *(name for name, _ in LOADS), "outputs", "loop_syncs", "batched_vs_naive",
          "tryon_memory", "oom_bisection", "offload")
STEP_NAMES = (*CHECKS, *(timing_name(kind, q) for q, kinds in ORDER.items() for kind in kinds))
ATTENTION_S = {"cuda": {"full": 20.0, "small": 2.0, "tiny": 1.0}, "cpu": {"full": 900.0, "small": 5.0, "tiny": 0.3}}


@dataclass(frozen=True)
class Step:
    """One check: its name, its planned seconds (asked just before it would start) and its run."""

    name: str
    planned_s: Callable[[], float]
    run: Callable[[Record], None]


def _cost(session: Session, requests: list, naive: bool = False) -> float:
    return session.costs.seconds(requests_work(session.config.llm, requests, naive))


def _outputs_s(session: Session) -> float:
    s = session.scale
    return session.load_plan_s("none") + _cost(session, [scenarios.t2i(s.mid_px, s.output_steps),
                                                        scenarios.understand(s.mid_px, s.answer_tokens)])


def _syncs_s(session: Session) -> float:
    px = session.scale.small_px
    runs = [_cost(session, scenarios.generations(px, n, 2, taylorseer=t)) for t in (False, True)
            for n in (SYNC_STEPS, 2 * SYNC_STEPS)]
    if session.is_cuda:
        runs += [2 * _cost(session, [scenarios.t2i(px, 8)])]
    return session.load_plan_s("none") + sum(runs)


def _naive_s(session: Session) -> float:
    requests = scenarios.generations(session.scale.mid_px, 2, 3)
    runs = _cost(session, requests) + _cost(session, requests, naive=True)
    if not session.is_cuda:
        return session.load_plan_s("none") + runs
    # and a float32 engine: twice the bytes of bf16 to load, matmuls at about 1/8 of bf16's rate
    float32_load = 2 * session.costs.load_seconds(session.weight_bytes["none"], "none")
    return session.load_plan_s("none") + runs + float32_load + 8 * runs


def _memory_s(session: Session) -> float:
    s = session.scale
    return session.load_plan_s("none") + _cost(session, scenarios.tryon_chunk(s.big_px, s.memory_steps))


def _oom_s(session: Session) -> float:
    s = session.scale
    one = _cost(session, [scenarios.t2i(s.small_px, STEPS)])
    # each job alone, then the chunk: every level of the bisection runs all of its jobs
    seconds = session.load_plan_s("none") + INJECTED_JOBS * one * 4
    if session.is_cuda:
        chunk = _cost(session, [scenarios.t2i(s.mid_px, STEPS)] * REAL_JOBS)
        seconds += 3 * chunk
    return seconds


def _load_s(session: Session, quantization: str) -> float:
    return session.costs.load_seconds(session.weight_bytes[quantization], quantization)


def build_steps(session: Session) -> list[Step]:
    """Every check, in order."""
    attention = ATTENTION_S[session.device.type][session.scale.size]
    steps = [
        Step("versions", lambda: 2.0 if session.is_cuda else 0.1, partial(check_versions, session)),
        Step("attention", lambda: attention, partial(check_attention, session)),
        *(Step(name, partial(_load_s, session, q), lambda rec, q=q: check_load(session, rec, q)) for name, q in LOADS),
        Step("outputs", partial(_outputs_s, session), partial(check_outputs, session)),
        Step("loop_syncs", partial(_syncs_s, session), partial(check_loop_syncs, session)),
        Step("batched_vs_naive", partial(_naive_s, session), partial(check_batched_vs_naive, session)),
        Step("tryon_memory", partial(_memory_s, session), partial(check_tryon_memory, session)),
        Step("oom_bisection", partial(_oom_s, session), partial(check_oom_bisection, session)),
        Step("offload", partial(offload_s, session), partial(check_offload, session)),
        *(Step(name, planned, run) for name, _, planned, run in timing_steps(session)),
    ]
    assert tuple(s.name for s in steps) == STEP_NAMES, "STEP_NAMES lists every step in order"
    return steps
