"""Check 8: an out-of-memory error is recovered by bisection, through the worker's own code.

Owns: running a chunk of generation jobs through ``worker.gpu.EngineHolder.run`` — the
function a GPU worker calls for a chunk, with its ``_ChunkRun`` splitting — around the engine
already loaded, without a database: the holder is built from a default ``Settings`` (no
services needed to construct one) and handed the engine, so nothing is loaded twice.

Two parts:
  * injected, on every device: ``worker.faults``' ``oom_above_rows:N`` with N the largest LLM
    forward of any single job (measured in this process by a forward hook, never guessed), so
    the chunk's batched forward raises ``torch.OutOfMemoryError``, its halves may too, and
    every job alone fits: all jobs must succeed and the fault must have fired. The fault hook
    has no handle (``install_fault`` registers it for the process); it is removed here by its
    key so the later timings run without it;
  * real, on CUDA: the caching allocator capped (``set_per_process_memory_fraction``) at the
    memory held now plus the geometric mean of the engine's estimates for one job and for the
    whole chunk (at least twice one job's) — one job fits its high-side estimate with room,
    the chunk does not — so the device itself raises the OOM. All jobs must succeed; if the chunk fitted after all,
    the check says so (a figure, not a failure: the injected part is the assertion then).
If ``worker.settings``' dependencies (pydantic-settings) are not importable, the check is
skipped naming the missing module. Leaves splitting to ``worker/gpu.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields

import torch

from bagel.config import GenerationParams
from bagel.requests import Request
from gpu_check.record import Record, Skip
from gpu_check.session import Session, size_text
from worker.faults import install_fault, parse_fault
from worker.gpu import EngineHolder, JobInput
from worker.params import resolve

INJECTED_JOBS = 4
REAL_JOBS = 16
STEPS = 3
_PARAM_NAMES = frozenset(f.name for f in fields(GenerationParams))


class _Records(logging.Handler):
    """Keeps the records of the worker's loggers during the check (what fired, what split)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _jobs(px: int, count: int, prefix: str) -> list[JobInput]:
    return [JobInput(job_id=f"{prefix}{k}", task="generate", prompt=f"a red ceramic mug, take {k:02d}", images=[],
                     think=False, width=px, height=px, params=resolve("generate", {"num_timesteps": STEPS, "seed": k},
                                                                      False))
            for k in range(count)]


def _largest_forward(engine, holder: EngineHolder, job: JobInput) -> int:
    """The largest LLM forward (rows) of ``job`` run alone, seen by a forward hook."""
    rows = [0]
    lm = engine.model.language_model
    handle = lm.register_forward_pre_hook(lambda module, args: rows.append(int(args[0].shape[0])))
    try:
        out = holder.run([job], progress=lambda *a: None, should_cancel=lambda k: False)[0]
    finally:
        handle.remove()
    if out.error_code is not None:
        raise RuntimeError(f"job {job.job_id} failed alone without a fault: {out.error_message}")
    return max(rows)


def check_oom_bisection(session: Session, rec: Record) -> None:
    try:  # the one import that needs the service's dependencies
        from worker.settings import Settings
    except ModuleNotFoundError as exc:
        raise Skip(f"worker dependencies not installed ({exc.name})") from exc
    engine = session.slot.get("none")
    holder = EngineHolder(Settings(_env_file=None, device=str(session.device)))
    holder.engine = engine  # the loaded engine: EngineHolder.load() returns it as it is
    holder.budget_source = "none (gpu-check)"
    px = session.scale.small_px
    jobs = _jobs(px, INJECTED_JOBS, "oom-")
    limit = max(_largest_forward(engine, holder, job) for job in jobs)
    seen = _Records()
    watched = [logging.getLogger(name) for name in ("worker.gpu", "worker.faults")]
    for logger in watched:
        logger.addHandler(seen)
    fault = install_fault(engine, parse_fault(f"oom_above_rows:{limit}"))
    try:
        outputs = holder.run(jobs, progress=lambda *a: None, should_cancel=lambda k: False)
    finally:
        fault.remove()  # the timings that follow run without it
        for logger in watched:
            logger.removeHandler(seen)
    fired = sum("fault injection: out of memory" in m for m in seen.messages)
    splits = sum("do not fit together" in m for m in seen.messages)
    failed = [f"{job.job_id}: {out.error_code}" for job, out in zip(jobs, outputs) if out.png is None]
    rec.expect(f"injected OOM (oom_above_rows:{limit}) fired", fired > 0, f"{fired} forwards refused")
    rec.expect("every job of the chunk succeeds after bisection", not failed and splits > 0,
               f"{splits} splits, failed: {failed or 'none'}")
    rec.figure(px=px, jobs=len(jobs), row_limit=limit, injected_ooms=fired, injected_splits=splits)
    rec.summary = f"injected: {fired} OOMs, {splits} splits, {len(jobs) - len(failed)}/{len(jobs)} jobs ok"
    if not session.is_cuda:
        rec.cuda_only("a real device OOM is recovered by bisection")
        return
    _real_oom(session, rec, engine, holder)


def _request(job: JobInput) -> Request:
    """The engine request the worker builds for a generation job (``worker.gpu``)."""
    params = GenerationParams(**{k: v for k, v in job.params.items() if k in _PARAM_NAMES})
    return Request(job.task, job.prompt, width=job.width, height=job.height, params=params)


def _real_oom(session: Session, rec: Record, engine, holder: EngineHolder) -> None:
    device = session.device
    jobs = _jobs(session.scale.mid_px, REAL_JOBS, "real-")
    one = holder.memory_estimate(jobs[0])
    whole = engine.memory_estimate([_request(job) for job in jobs]).total
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved(device)
    total = torch.cuda.get_device_properties(device).total_memory
    cap = held + max(int(math.sqrt(one * whole)), 2 * one)
    seen = _Records()
    logging.getLogger("worker.gpu").addHandler(seen)
    index = device.index if device.index is not None else torch.cuda.current_device()  # it wants an index
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    try:
        outputs = holder.run(jobs, progress=lambda *a: None, should_cancel=lambda k: False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        logging.getLogger("worker.gpu").removeHandler(seen)
    splits = sum("do not fit together" in m for m in seen.messages)
    failed = [f"{job.job_id}: {out.error_message}" for job, out in zip(jobs, outputs) if out.png is None]
    rec.figure(real_jobs=len(jobs), real_px=session.scale.mid_px, real_cap_bytes=cap, real_held_bytes=held,
               real_estimate_one_bytes=one, real_estimate_all_bytes=whole, real_splits=splits)
    rec.expect("a real device OOM is recovered by bisection: every job succeeds", not failed,
               f"{len(failed)} failed, first {failed[:1]}")
    outcome = (f"real: {splits} splits under a {size_text(cap - held)} cap" if splits
               else f"real: not triggered, {len(jobs)} jobs fit in {size_text(cap - held)}")
    rec.figure(real_outcome=outcome)
    rec.summary += f"; {outcome}"
