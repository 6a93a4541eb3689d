"""Checks 1 and 3–7: versions, loads, outputs, host syncs, batched vs naive, try-on memory.

Owns what each of these checks runs and asserts (the issue's wording in each ``expect``).
Leaves the engine to ``session.py``, the requests to ``scenarios.py``.

Batched vs one-at-a-time (check 6): generations of different prompts and shapes, run together
and with ``naive=True``, over ONE Euler step (2 timesteps), compared by the relative L2
difference of their final latents. One step, because a random model amplifies any rounding
difference at every step (CFG scale 4 with sharp random attention: on the ``small`` preset in
float32, 5e-6 after one step, 7e-4 after four), so a multi-step comparison measures that
chaos, not batching; a batching error (another request's context, a shifted position, a wrong
mask) changes the result by O(1) — two different requests differ by ~1.4. In float32 (the CPU;
on CUDA a float32 engine is loaded for this check) batched equals naive within 1e-2: measured
below 1e-6 on the ``tiny`` preset (CPU) and 3.4e-3 on the real shapes (an H200, 2026-11-28,
where the 28 random layers amplify float32 rounding that much). In bf16 no bound on batched vs
naive works: on the real shapes the random model puts both bf16 runs at rel L2 1.0 from the
float32 result and 0.6 from each other. So on CUDA the float32 naive result is the truth, and
the bf16 batched result must be no further from it than the bf16 naive result is, within
``BF16_SLACK`` (×1.25 + 0.05).
"""

from __future__ import annotations

import collections
import platform
import shutil
import subprocess
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bagel.attention import has_flash_attn, has_torch_varlen
from bagel.loading import paper_weight_bytes
from gpu_check import scenarios
from gpu_check.plan import requests_work
from gpu_check.record import Record, Skip
from gpu_check.session import Session, allocated_bytes, dtype_name, size_text

GIB = 2**30
LOAD_TOLERANCE = 0.05
NAIVE_TOLERANCE_F32 = 1e-2
BF16_SLACK = (1.25, 0.05)  # bf16 batched error ≤ 1.25 × bf16 naive error + 0.05 (errors vs float32)
HOST_OPS = ("aten._local_scalar_dense.default", "aten.nonzero.default")
SYNC_STEPS = 6  # timesteps of the short run; the long one has twice as many


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def check_versions(session: Session, rec: Record) -> None:
    """Check 1: torch/cuDNN/bitsandbytes versions, the GPU, its memory, driver and CUDA runtime."""
    bnb_missing = session.bitsandbytes_missing
    bnb_version = None
    if bnb_missing is None:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    rec.figure(python=platform.python_version(), torch=torch.__version__, cuda_runtime=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               bitsandbytes=bnb_version, bitsandbytes_error=bnb_missing, flash_attn=has_flash_attn(),
               torch_varlen=has_torch_varlen(), cpu_threads=torch.get_num_threads(), device=str(session.device))
    bnb = f"bitsandbytes {bnb_version}" if bnb_version else "bitsandbytes not importable"
    head = (f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {rec.figures['cudnn']}), {bnb}, "
            f"python {platform.python_version()}")
    if not session.is_cuda:
        rec.summary = f"{head}; cpu, {torch.get_num_threads()} threads"
        return
    if not rec.expect("CUDA is available", torch.cuda.is_available(),
                      f"torch {torch.__version__}: torch.cuda.is_available() is False"):
        rec.summary = head
        return
    props = torch.cuda.get_device_properties(session.device)
    free, total = torch.cuda.mem_get_info(session.device)
    driver = _driver_version()
    rec.figure(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_bytes=total, free_bytes=free,
               multiprocessors=props.multi_processor_count, driver=driver)
    rec.summary = f"{head}; {props.name}, {total / GIB:.0f} GiB ({free / GIB:.0f} free), driver {driver}"


def _off_device(engine, device: torch.device) -> list[str]:
    modules = {"model": engine.model, "vae": engine.vae}
    return [f"{root}.{name}" for root, module in modules.items()
            for name, t in [*module.named_parameters(), *module.named_buffers()]
            if t.is_meta or t.device.type != device.type]


def check_load(session: Session, rec: Record, quantization: str) -> None:
    """Check 3: a full-size load in bf16 (``none``), nf4 or int8: every tensor on the device and
    the allocated memory within 5% of ``weight_bytes``."""
    if quantization != "none" and session.bitsandbytes_missing:
        raise Skip("bitsandbytes not importable")
    facts = session.slot.load(quantization, torch.bfloat16)
    engine = session.slot.engine
    paper = paper_weight_bytes(engine.config, quantization=quantization)
    off = _off_device(engine, session.device)
    rec.expect("every parameter and buffer is on the device", not off, f"{len(off)} are not, first {off[:3]}")
    rec.figure(quantization=quantization, dtype=dtype_name(facts.dtype), load_s=facts.seconds,
               weight_bytes=facts.weight_bytes, paper_weight_bytes=paper, paper_minus_weight_bytes=paper - facts.weight_bytes)
    summary = f"{facts.seconds:.1f} s, weight_bytes {size_text(facts.weight_bytes)} (paper {size_text(paper)})"
    if session.is_cuda:
        used = facts.allocated_after - facts.allocated_before
        rel = abs(used - facts.weight_bytes) / facts.weight_bytes
        rec.expect(f"allocated memory within {LOAD_TOLERANCE:.0%} of weight_bytes", rel <= LOAD_TOLERANCE,
                   f"allocated {size_text(used)} vs weight_bytes {size_text(facts.weight_bytes)} ({rel:.1%} off)")
        rec.figure(allocated_bytes=used, allocated_off=rel, memory_allocated=facts.allocated_after)
        summary += f", allocated {size_text(used)} ({rel:.1%} off)"
    else:
        rec.cuda_only(f"allocated memory within {LOAD_TOLERANCE:.0%} of weight_bytes")
    rec.summary = summary
    if not session.slot.holds("none"):  # keep only the work engine (bf16 on CUDA)
        session.slot.drop()


def check_outputs(session: Session, rec: Record) -> None:
    """Check 4: a generate and an understand give finite, non-constant output."""
    scale = session.scale
    engine = session.slot.get("none")
    generate = scenarios.t2i(scale.mid_px, scale.output_steps)
    question = scenarios.understand(scale.mid_px, scale.answer_tokens)
    results, traces = engine.run_traced([generate, question], record=True)
    latent = traces[0]["final_latent"].float()
    pixels = np.asarray(results[0].image, dtype=np.float32)
    rec.expect(f"{scale.mid_px}² generate: final latent finite", bool(torch.isfinite(latent).all()),
               f"{int((~torch.isfinite(latent)).sum())} non-finite values")
    rec.expect(f"{scale.mid_px}² generate: latent and picture non-constant",
               latent.std().item() > 0 and pixels.std() > 0,
               f"latent std {latent.std().item():.3g}, pixel std {pixels.std():.3g}")
    logits = traces[1]["step_logits"].float()
    ids = traces[1]["generated_ids"]
    rec.expect(f"{scale.answer_tokens}-token understand: logits finite", bool(torch.isfinite(logits).all()),
               f"{int((~torch.isfinite(logits)).sum())} non-finite logits")
    varied = logits.std(dim=-1).min().item() > 0 and (len(ids) < 3 or len(set(ids)) > 1)
    rec.expect(f"{scale.answer_tokens}-token understand: non-constant", varied,
               f"{len(ids)} tokens, {len(set(ids))} distinct, min logit std {logits.std(dim=-1).min().item():.3g}")
    rec.figure(px=scale.mid_px, steps=scale.output_steps, latent_mean=latent.mean().item(),
               latent_std=latent.std().item(), pixel_mean=float(pixels.mean()), pixel_std=float(pixels.std()),
               answer_tokens=len(ids), answer_stop=traces[1]["stop_reason"], answer=(results[1].text or "")[:80])
    rec.summary = (f"latent std {latent.std().item():.2f}, pixel std {pixels.std():.1f}; answer "
                   f"{len(ids)} tokens ({traces[1]['stop_reason']}), {len(set(ids))} distinct")


class _DeviceSyncs(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_OPS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _sync_requests(px: int, steps: int, taylorseer: bool):
    # cfg_interval switches guidance off half-way: both layouts of the loop are used
    return scenarios.generations(px, steps, 2, cfg_interval=(0.5, 1.0), taylorseer=taylorseer)


def check_loop_syncs(session: Session, rec: Record) -> None:
    """Check 5: the loop's sync count does not grow with steps; on CUDA every step after the
    first runs under ``set_sync_debug_mode("error")``."""
    engine = session.slot.get("none")
    px = session.scale.small_px
    counts = {}
    for taylorseer in (False, True):
        seen = {}
        for steps in (SYNC_STEPS, 2 * SYNC_STEPS):
            with _DeviceSyncs() as syncs:
                engine.run(_sync_requests(px, steps, taylorseer))
            seen[steps] = dict(syncs.counts)
        counts[f"taylorseer={taylorseer}"] = {str(k - 1): v for k, v in seen.items()}
        short, long = seen[SYNC_STEPS], seen[2 * SYNC_STEPS]
        rec.expect(f"host syncs do not grow with steps (taylorseer {taylorseer})", short == long,
                   f"{SYNC_STEPS - 1} steps: {short}; {2 * SYNC_STEPS - 1} steps: {long}")
    rec.figure(sync_counts=counts)
    rec.summary = "sync counts equal for N and 2N steps"
    what = 'no host sync after step 1 under torch.cuda.set_sync_debug_mode("error")'
    if not session.is_cuda:
        rec.cuda_only(what)
        return
    for taylorseer in (False, True):
        steps_seen = []

        def progress(index: int, step: int, total: int) -> None:
            # after the first step every sync is an error, until the last step (the picture is
            # then decoded and copied to the host, as it must be)
            torch.cuda.set_sync_debug_mode("error" if step < total else "default")
            steps_seen.append(step)

        error = None
        try:
            engine.run([scenarios.t2i(px, 8, cfg_interval=(0.5, 1.0), taylorseer=taylorseer)], progress=progress)
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rec.expect(f"{what} (taylorseer {taylorseer})", error is None and steps_seen == list(range(1, 8)),
                   error or f"steps reported {steps_seen}")
    rec.summary += "; no sync under sync-debug error"


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.float(), y.float()
    return ((x - y).norm() / y.norm()).item()


def _batched_and_naive(engine, px: int) -> tuple[list[dict], list[dict]]:
    _, batched = engine.run_traced(scenarios.generations(px, 2, 3), record=True)
    _, naive = engine.run_traced(scenarios.generations(px, 2, 3), record=True, naive=True)
    return batched, naive


def check_batched_vs_naive(session: Session, rec: Record) -> None:
    """Check 6: batched vs one-at-a-time (see the module docstring)."""
    px = session.scale.mid_px
    engine = session.slot.get("none")
    attention = engine.attention.name
    batched, naive = _batched_and_naive(engine, px)
    del engine  # the float32 engine replaces it
    low = session.dtype != torch.float32
    if low:  # the float32 truth both bf16 runs are measured against
        session.slot.load("none", torch.float32)
        batched32, naive32 = _batched_and_naive(session.slot.engine, px)
        session.slot.drop()
    else:
        batched32, naive32 = batched, naive
    rels = [_rel(b["final_latent"], n["final_latent"]) for b, n in zip(batched32, naive32)]
    cross = _rel(naive32[0]["final_latent"], naive32[2]["final_latent"])  # two square requests
    rec.expect(f"float32: batched final latents equal one-at-a-time within rel L2 {NAIVE_TOLERANCE_F32:g}",
               max(rels) <= NAIVE_TOLERANCE_F32,
               f"rel L2 per request {[f'{r:.2e}' for r in rels]}; two different requests differ by {cross:.2f}")
    rec.figure(px=px, requests=3, timesteps=2, f32_rel_l2=rels, cross_request_rel_l2=cross)
    rec.summary = f"float32: max rel L2 {max(rels):.2e} (different requests {cross:.2f})"
    if not low:
        return
    scale, slack = BF16_SLACK
    err_b = [_rel(b["final_latent"], t["final_latent"]) for b, t in zip(batched, naive32)]
    err_n = [_rel(n["final_latent"], t["final_latent"]) for n, t in zip(naive, naive32)]
    bn = [_rel(b["final_latent"], n["final_latent"]) for b, n in zip(batched, naive)]
    ok = all(b <= scale * n + slack for b, n in zip(err_b, err_n))
    name = dtype_name(session.dtype)
    rec.expect(f"{name}: batched is no further from float32 than one-at-a-time (x{scale:g} + {slack:g})", ok,
               f"vs float32: batched {[f'{r:.2f}' for r in err_b]}, naive {[f'{r:.2f}' for r in err_n]}")
    rec.figure(dtype=name, batched_vs_f32=err_b, naive_vs_f32=err_n, batched_vs_naive=bn,
               attention=attention)
    rec.summary += (f"; {name} vs float32: batched max {max(err_b):.2f}, naive max {max(err_n):.2f} "
                    f"(batched vs naive {max(bn):.2f})")


def check_tryon_memory(session: Session, rec: Record) -> None:
    """Check 7: a try-on chunk of 8 peaks at or below weights + ``memory_estimate``."""
    scale, device = session.scale, session.device
    engine = session.slot.get("none")
    requests = scenarios.tryon_chunk(scale.big_px, scale.memory_steps)
    estimate = engine.memory_estimate(requests)
    if session.is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = allocated_bytes(device)
    started = time.perf_counter()
    results = engine.run(requests)
    if session.is_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    session.costs.observe_run(requests_work(session.config.llm, requests), seconds, "none")
    encodes = results[0].stats["run_context_encodes"]
    rec.expect("every scene gives a picture", all(r.image is not None for r in results),
               f"{sum(r.image is not None for r in results)} of {len(results)}")
    rec.expect("the product is encoded once per chunk", encodes == 1, f"{encodes} context encodes")
    rec.figure(px=scale.big_px, requests=len(requests), steps=scale.memory_steps, seconds=seconds,
               weight_bytes=engine.checkpoint.weight_bytes, estimate_bytes=estimate.total,
               estimate=estimate.describe())
    what = "peak allocated memory at or below weights + memory_estimate"
    if not session.is_cuda:
        rec.cuda_only(what)
        rec.summary = f"estimate {size_text(estimate.total)}; {seconds:.1f} s"
        return
    peak = torch.cuda.max_memory_allocated(device)
    limit = baseline + estimate.total
    rec.expect(what, peak <= limit, f"peak {size_text(peak)}, weights and other live tensors "
               f"{size_text(baseline)} + estimate {size_text(estimate.total)} = {size_text(limit)}")
    rec.figure(baseline_bytes=baseline, peak_bytes=peak, working_peak_bytes=peak - baseline,
               estimate_used=(peak - baseline) / estimate.total)
    rec.summary = (f"working peak {size_text(peak - baseline)} of estimate {size_text(estimate.total)} "
                   f"({(peak - baseline) / estimate.total:.0%}); {seconds:.1f} s")
