"""Check 9: CPU offload of the decoder layers (``offload="layers"``) against the resident mode.

Owns: loading the nf4 engine twice — resident, then with its decoder layers in pinned host
memory — and timing one ``mid_px``² generate of ``steps`` timesteps on each (512², 50 timesteps
on the real shapes) after a warm-up on CUDA: seconds per image, peak device memory and the
weights each load left on the device. Asserts, on every device: the two pictures are equal (the
offloaded layers are byte copies computed by the same kernels on the same stream). On CUDA: the
offloaded load's device memory within 5% of ``memory.weight_placement``, and the copy/compute
overlap, read from a ``torch.profiler`` trace of one more offloaded run (2 timesteps): the
layer copies are the host-to-device memcpys of the stream that carries most of them, in
groups of one layer's tensors (``len(offloader.host[0])`` memcpys, issued in that order); a
layer's copy overlaps when a kernel of another stream (the compute stream) runs during it —
the copy of layer i+1 running while layer i computes. At least 90% of the layer copies must
overlap. Figures: the share of copy time hidden behind kernels, the copy throughput, the layer
copies and forwards of the timed run. Leaves the engines to ``session.py`` and the request to
``scenarios.py``.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from bagel.loading import paper_layer_tensor_bytes
from bagel.memory import weight_placement
from gpu_check import scenarios
from gpu_check.plan import requests_work
from gpu_check.record import Record, Skip
from gpu_check.session import Session, size_text

QUANTIZATION = "nf4"
WARM_UP_STEPS = 2
PROFILED_STEPS = 2
OVERLAP_MIN = 0.9  # share of layer copies that must overlap a compute kernel
WEIGHT_TOLERANCE = 0.05


def _sync(session: Session) -> None:
    if session.is_cuda:
        torch.cuda.synchronize(session.device)


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _covered(span: tuple[float, float], merged: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(span[1], end) - max(span[0], start)) for start, end in merged)


def _stream(event: dict) -> object:
    """A device event's stream: ``args.stream`` (kineto), else its trace row (``tid``)."""
    return event["args"].get("stream", event.get("tid"))


def copy_overlap(events: list[dict], tensors_per_layer: int) -> dict:
    """Layer copies and their overlap with kernels, from chrome-trace ``events`` (see the module
    docstring; times in µs)."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e and isinstance(e.get("args"), dict)]
    h2d = [e for e in spans if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    if not h2d:
        return {"layer_copies": 0}
    carried = Counter()
    for e in h2d:
        carried[_stream(e)] += e["args"].get("bytes", 0)
    stream = carried.most_common(1)[0][0]
    memcpys = sorted((e for e in h2d if _stream(e) == stream), key=lambda e: e["ts"])
    kernels = _merged([(e["ts"], e["ts"] + e["dur"]) for e in spans
                       if e.get("cat") == "kernel" and _stream(e) != stream])
    layers = [memcpys[k:k + tensors_per_layer] for k in range(0, len(memcpys) - tensors_per_layer + 1,
                                                             tensors_per_layer)]
    overlapping = sum(any(_covered((e["ts"], e["ts"] + e["dur"]), kernels) > 0 for e in layer) for layer in layers)
    busy = sum(e["dur"] for e in memcpys)
    hidden = sum(_covered((e["ts"], e["ts"] + e["dur"]), kernels) for e in memcpys)
    return {"layer_copies": len(layers), "overlapping_layer_copies": overlapping,
            "overlapping_share": overlapping / len(layers) if layers else 0.0,
            "hidden_copy_time_share": hidden / busy if busy else 0.0, "memcpys": len(memcpys),
            "copied_bytes": carried[stream], "copy_gb_per_s": carried[stream] / busy / 1e3 if busy else None}


def _profiled_overlap(session: Session, engine) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.run([scenarios.t2i(session.scale.mid_px, PROFILED_STEPS)])
        _sync(session)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return copy_overlap(events, len(engine.checkpoint.offloader.host[0]))


def _measure(session: Session, offload: str) -> dict:
    """Load the nf4 engine with ``offload``, warm it up (CUDA) and time one generate."""
    facts = session.slot.load(QUANTIZATION, session.dtype, offload)
    engine = session.slot.engine
    px, steps = session.scale.mid_px, session.scale.steps
    if session.is_cuda:
        engine.run([scenarios.t2i(px, WARM_UP_STEPS)])
        _sync(session)
        torch.cuda.reset_peak_memory_stats(session.device)
    offloader = engine.checkpoint.offloader
    copies = offloader.copies if offloader else 0
    started = time.perf_counter()
    [result] = engine.run([scenarios.t2i(px, steps)])
    _sync(session)
    out = {"seconds": time.perf_counter() - started, "load_s": facts.seconds, "image": result.image,
           "forwards": result.stats["llm_forwards"]}
    if session.is_cuda:
        out.update(peak_bytes=torch.cuda.max_memory_allocated(session.device),
                   device_weight_bytes=facts.allocated_after - facts.allocated_before)
    if offloader is not None:
        out.update(copies=offloader.copies - copies, host_bytes=offloader.host_bytes,
                   buffer_bytes=offloader.device_bytes, layers=len(offloader.layers))
    return out


def check_offload(session: Session, rec: Record) -> None:
    if session.bitsandbytes_missing:
        raise Skip("bitsandbytes not importable")
    runs = {"resident": _measure(session, "none")}
    runs["offloaded"] = _measure(session, "layers")
    engine = session.slot.engine
    off = runs["offloaded"]
    same = runs["resident"]["image"].tobytes() == off["image"].tobytes()
    rec.expect("the offloaded picture equals the resident one", same,
               f"{session.scale.mid_px}² generate, {session.scale.steps} timesteps, nf4")
    for name, run in runs.items():
        rec.figure(**{f"{name}_{key}": value for key, value in run.items() if key != "image"})
    ratio = off["seconds"] / runs["resident"]["seconds"]
    rec.figure(quantization=QUANTIZATION, px=session.scale.mid_px, timesteps=session.scale.steps,
               offloaded_over_resident=ratio)
    rec.summary = (f"{session.scale.mid_px}² nf4: resident {runs['resident']['seconds']:.2f} s/image, offloaded "
                   f"{off['seconds']:.2f} ({ratio:.2f}x)")
    what_weights = f"offloaded load's device memory within {WEIGHT_TOLERANCE:.0%} of weight_placement"
    what_overlap = f"at least {OVERLAP_MIN:.0%} of the layer copies overlap compute kernels"
    if not session.is_cuda:
        rec.cuda_only(what_weights)
        rec.cuda_only(what_overlap)
        session.slot.drop()
        return
    placement = weight_placement(engine.config, dtype=engine.dtype, quantization=QUANTIZATION, offload="layers")
    used = off["device_weight_bytes"]
    rel = abs(used - placement.device_bytes) / placement.device_bytes
    rec.expect(what_weights, rel <= WEIGHT_TOLERANCE,
               f"allocated {size_text(used)} vs {size_text(placement.device_bytes)} ({rel:.1%} off)")
    overlap = _profiled_overlap(session, engine)
    session.slot.drop()
    rec.figure(placement_device_bytes=placement.device_bytes, placement_host_bytes=placement.host_bytes,
               overlap=overlap)
    share = overlap.get("overlapping_share", 0.0)
    rec.expect(what_overlap, overlap["layer_copies"] > 0 and share >= OVERLAP_MIN,
               f"{overlap.get('overlapping_layer_copies', 0)} of {overlap['layer_copies']} layer copies")
    rec.summary += (f"; peak {size_text(runs['resident']['peak_bytes'])} vs {size_text(off['peak_bytes'])}; "
                    f"{share:.0%} of layer copies overlap compute, "
                    f"{overlap.get('hidden_copy_time_share', 0.0):.0%} of copy time hidden")


def planned_seconds(session: Session) -> float:
    """Two nf4 loads (the offloaded one also copies its layers to pinned memory), the two timed
    runs — the offloaded one as if nothing overlapped: its compute plus every forward's layer
    copies — and on CUDA the warm-ups and the profiled run."""
    s, costs = session.scale, session.costs
    host = session.config.llm.num_hidden_layers * sum(paper_layer_tensor_bytes(session.config,
                                                                               quantization=QUANTIZATION))
    load = costs.load_seconds(session.weight_bytes[QUANTIZATION], QUANTIZATION)
    seconds = 2 * load + host / costs.nominal.load_bytes_per_s
    runs = [requests_work(session.config.llm, [scenarios.t2i(s.mid_px, s.steps)])]
    if session.is_cuda:
        runs += [requests_work(session.config.llm, [scenarios.t2i(s.mid_px, n)])
                 for n in (WARM_UP_STEPS, WARM_UP_STEPS, PROFILED_STEPS)]
    for work in runs:
        seconds += 2 * costs.seconds(work, QUANTIZATION) + work.forwards * host / costs.nominal.h2d_bytes_per_s
    return seconds
