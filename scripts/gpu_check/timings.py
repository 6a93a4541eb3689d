"""Check 10: timings, in bf16 and then (with bitsandbytes) nf4, most important first.

Owns: what each timing runs, its planned cost, one warm-up on CUDA (the same requests with 2
timesteps, or 4 think tokens: kernels chosen, allocator warmed), the measurement
(``torch.cuda.synchronize`` on both sides of the wall clock) and its figures. Leaves the
requests to ``scenarios.py`` and the prices to ``plan.py``.

The timings (sizes for ``full``; ``--size`` scales them):
  * ``tryon8_batched`` — a try-on chunk of 8 scenes of one 1024² product, 10 timesteps (a
    50-timestep chunk costs ~200 s on an H200: too much for one 10-minute run), s/image;
  * ``t2i`` — a 1024² generation, 50 timesteps, cfg_interval [0.4, 1];
  * ``edit`` — a 1024² edit, 50 timesteps;
  * ``tryon8_naive`` — the same chunk one request at a time (``naive=True``), with the
    batched/naive ratio when the batched one ran;
  * ``think`` — a generation whose think text may reach 1,024 tokens (a 256² picture of 2
    timesteps after it); the tokens actually generated are reported: with random weights the
    text may stop early at ``<|im_end|>``, and the summary says so. It runs ``run_traced`` with
    ``record=True`` for the token ids, which copies each step's logits to the host (0.6 MB per
    token, a fraction of a millisecond against a ~25 ms decode step);
  * ``tryon8_taylorseer`` — the batched chunk with ``taylorseer=True``.
Order: the service's workload (try-on chunks, batched) first, then single-image latency,
the batching baseline, the think decode and TaylorSeer; bf16 before nf4, where the think
decode moves up and the naive baseline goes last. A run's FLOP rate recalibrates the plans of
the runs after it (``plan.Costs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bagel.requests import Request
from gpu_check import scenarios
from gpu_check.plan import Scale, Work, requests_work
from gpu_check.record import Record, Skip
from gpu_check.session import Session, dtype_name

KINDS = ("tryon8_batched", "t2i", "edit", "tryon8_naive", "think", "tryon8_taylorseer")
# nf4: the decode (memory-bound: where 4-bit weights change the most) before the edit
NF4_KINDS = ("tryon8_batched", "t2i", "think", "edit", "tryon8_taylorseer", "tryon8_naive")
ORDER = {"none": KINDS, "nf4": NF4_KINDS}
WARM_UP_TIMESTEPS = 2
WARM_UP_THINK_TOKENS = 4


def _steps(warm_up: bool, steps: int) -> int:
    return WARM_UP_TIMESTEPS if warm_up else steps


# kind -> requests(scale, warm_up)
_BUILDERS: dict[str, Callable[[Scale, bool], list[Request]]] = {
    "tryon8_batched": lambda s, w: scenarios.tryon_chunk(s.big_px, _steps(w, s.tryon_steps)),
    "tryon8_naive": lambda s, w: scenarios.tryon_chunk(s.big_px, _steps(w, s.tryon_steps)),
    "tryon8_taylorseer": lambda s, w: scenarios.tryon_chunk(s.big_px, _steps(w, s.tryon_steps), taylorseer=True),
    "t2i": lambda s, w: [scenarios.t2i(s.big_px, _steps(w, s.steps))],
    "edit": lambda s, w: [scenarios.edit(s.big_px, _steps(w, s.steps))],
    "think": lambda s, w: [scenarios.think(s.small_px, WARM_UP_THINK_TOKENS if w else s.think_tokens)],
}


def timing_name(kind: str, quantization: str) -> str:
    return f"time_{kind}" if quantization == "none" else f"time_{kind}_{quantization}"


def _requests(session: Session, kind: str, warm_up: bool = False) -> list[Request]:
    return _BUILDERS[kind](session.scale, warm_up)


def _work(session: Session, requests: list[Request], naive: bool) -> Work:
    return requests_work(session.config.llm, requests, naive)


def planned_seconds(session: Session, kind: str, quantization: str) -> float:
    """The load (if another engine is held), the warm-up (CUDA) and the timed run."""
    naive = kind == "tryon8_naive"
    costs = session.costs
    seconds = session.load_plan_s(quantization) + costs.seconds(_work(session, _requests(session, kind), naive),
                                                                quantization)
    if session.is_cuda:
        seconds += costs.seconds(_work(session, _requests(session, kind, warm_up=True), naive), quantization)
    return seconds


def _sync(session: Session) -> None:
    if session.is_cuda:
        torch.cuda.synchronize(session.device)


def run_timing(session: Session, rec: Record, kind: str, quantization: str) -> None:
    if quantization != "none" and session.bitsandbytes_missing:
        raise Skip("bitsandbytes not importable")
    loaded = not session.slot.holds(quantization)
    started = time.perf_counter()
    engine = session.slot.get(quantization)
    if loaded:
        rec.figure(load_s=time.perf_counter() - started)
    naive = kind == "tryon8_naive"
    if session.is_cuda:
        engine.run(_requests(session, kind, warm_up=True), naive=naive)
    requests = _requests(session, kind)
    work = _work(session, requests, naive)
    _sync(session)
    if session.is_cuda:
        torch.cuda.reset_peak_memory_stats(session.device)
    started = time.perf_counter()
    results, traces = engine.run_traced(requests, naive=naive, record=kind == "think")
    _sync(session)
    seconds = time.perf_counter() - started
    images = sum(r.image is not None for r in results)
    stats = results[0].stats
    r = requests[0]
    rec.figure(quantization=quantization, dtype=dtype_name(engine.dtype), seconds=seconds, images=images,
               px=r.images[0].size[0] if r.task == "edit" else r.width, timesteps=r.params.num_timesteps,
               requests=len(requests), denoise_seconds=stats["denoise_seconds"],
               planned_tflop=work.flops / 1e12, tflops=work.flops / seconds / 1e12)
    if session.is_cuda:
        rec.figure(peak_bytes=torch.cuda.max_memory_allocated(session.device))
    if kind == "think":
        _think_figures(session, rec, quantization, results[0], traces[0])
        return
    per_image = seconds / max(images, 1)
    rec.figure(seconds_per_image=per_image)
    rec.summary = (f"{per_image:.2f} s/image ({len(requests)} x {rec.figures['px']}² px, "
                   f"{r.params.num_timesteps} timesteps, {work.flops / seconds / 1e12:.3g} TFLOP/s planned-work)")
    if naive:
        batched = session.measured.get(timing_name("tryon8_batched", quantization))
        if batched:
            rec.figure(batched_speedup=per_image / batched)
            rec.summary += f"; batched is {per_image / batched:.2f}x faster"
    else:
        session.costs.observe_run(work, seconds, quantization)
        session.measured[rec.name] = per_image


def _think_figures(session: Session, rec: Record, quantization: str, result, trace: dict) -> None:
    limit = session.scale.think_tokens
    tokens = len(trace["generated_ids"])
    decode_s = result.stats["model_seconds"] - result.stats["denoise_seconds"]
    stop = trace["stop_reason"]
    session.costs.observe_tokens(tokens, decode_s, quantization)
    rec.figure(think_tokens_limit=limit, think_tokens=tokens, stop_reason=stop, think_phase_seconds=decode_s,
               tokens_per_s=tokens / decode_s if decode_s > 0 else None, think_chars=len(result.think_text or ""))
    ended = (f"stopped early at <|im_end|> after {tokens} of {limit} tokens" if stop == "eos"
             else f"{tokens} tokens ({stop})")
    rec.figure(think_phase="model_seconds - denoise_seconds: context prefills, the decode, VAE decode")
    rate = f"{tokens / decode_s:.1f} tokens/s" if decode_s > 0 else "no time measured"
    rec.summary = f"{rate} over the think phase ({decode_s:.1f} s); {ended}"


def timing_steps(session: Session) -> list[tuple[str, str, Callable[[], float], Callable[[Record], None]]]:
    """(name, quantization, planned seconds, run) of every timing, in order."""
    out = []
    for quantization, kinds in ORDER.items():
        for kind in kinds:
            out.append((timing_name(kind, quantization), quantization,
                        lambda k=kind, q=quantization: planned_seconds(session, k, q),
                        lambda rec, k=kind, q=quantization: run_timing(session, rec, k, q)))
    return out

