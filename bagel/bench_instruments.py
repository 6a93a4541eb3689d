"""What ``bagel bench`` measures around an ``engine.run``, without changing what it computes.

Owns: the clock (host seconds on the CPU, CUDA events on a GPU), the forward hooks that count
and time the decoder's forwards (context prefill, think decode, denoising-loop query blocks with
their analytic FLOPs), the picture encodes and VAE decodes, the progress callback that closes
each denoising loop's span, and the sampler of the process's peak resident memory. Leaves the
scenarios and the report to ``bench.py``.
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from dataclasses import dataclass, field

import torch

from bagel.flops import forward_flops
from bagel.loading import LoadedCheckpoint


class Clock:
    """Timestamps that can be subtracted after the fact: host seconds on the CPU, recorded
    CUDA events on a GPU (so timing adds no host-device sync inside the loop)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


@dataclass
class Tally:
    """What the hooks saw during one ``engine.run``."""

    forwards: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0, "loop": 0})
    loop_flops: int = 0
    loop_rows: int = 0
    loop_forward_stamps: list[tuple] = field(default_factory=list)
    loop_spans: list[list] = field(default_factory=list)
    vae_encodes: int = 0
    vit_encodes: int = 0
    images_decoded: int = 0
    open_span: object = None
    phase_stamps: list[tuple] = field(default_factory=list)  # (phase, start, end) of timed forwards


class Instruments:
    """Forward hooks on the decoder, the VAE encoder/decoder and SigLIP of one checkpoint, and
    the progress callback that closes loop spans. ``begin()`` starts a fresh tally."""

    def __init__(self, checkpoint: LoadedCheckpoint) -> None:
        self.cfg = checkpoint.config.llm
        self.clock = Clock(checkpoint.device)
        self.tally = Tally()
        self._pending: list = []
        self._open: dict[str, object] = {}
        model, vae = checkpoint.model, checkpoint.vae
        self._handles = [
            model.language_model.register_forward_pre_hook(self._llm_pre, with_kwargs=True),
            model.language_model.register_forward_hook(self._llm_post, with_kwargs=True),
            vae.encoder.register_forward_pre_hook(self._vae_encode),
            vae.decoder.register_forward_pre_hook(self._vae_decode),
            model.vit_model.register_forward_pre_hook(self._vit_encode),
        ]
        for phase, module in (("encode", vae.encoder), ("encode", model.vit_model), ("vae_decode", vae.decoder)):
            self._handles += [module.register_forward_pre_hook(lambda *_, p=phase: self._start(p)),
                              module.register_forward_hook(lambda *_, p=phase: self._stop(p))]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def begin(self) -> Tally:
        self.tally = Tally()
        self._pending = []
        self._open = {}
        return self.tally

    @staticmethod
    def _batch(args: tuple, kwargs: dict):
        return kwargs["batch"] if "batch" in kwargs else args[1]

    def _llm_pre(self, module, args, kwargs) -> None:
        batch = self._batch(args, kwargs)
        segments = batch.segments
        if any(seg.write_start is None for seg in segments):
            kind = "loop"
        elif all(seg.query_len == 1 for seg in segments):
            kind = "decode"
        else:
            kind = "prefill"
        tally = self.tally
        tally.forwards[kind] += 1
        if kind != "loop":
            self._start("think" if kind == "decode" else kind)
        else:
            stamp = self.clock.now()
            if tally.open_span is None:
                tally.open_span = stamp
            tally.loop_flops += forward_flops(self.cfg, batch)
            tally.loop_rows += batch.length
            self._pending.append(stamp)

    def _llm_post(self, module, args, kwargs, output) -> None:
        if self._pending:
            self.tally.loop_forward_stamps.append((self._pending.pop(), self.clock.now()))
        for phase in ("think", "prefill"):
            self._stop(phase)

    def _start(self, phase: str) -> None:
        self._open[phase] = self.clock.now()

    def _stop(self, phase: str) -> None:
        started = self._open.pop(phase, None)
        if started is not None:
            self.tally.phase_stamps.append((phase, started, self.clock.now()))

    def _vae_encode(self, module, args) -> None:
        self.tally.vae_encodes += int(args[0].shape[0])

    def _vae_decode(self, module, args) -> None:
        self.tally.images_decoded += int(args[0].shape[0])

    def _vit_encode(self, module, args) -> None:
        self.tally.vit_encodes += int(args[2].numel()) - 1  # cu_seqlens: one more than pictures

    def on_progress(self, index: int, step: int, total: int) -> None:
        if step != total:
            return
        tally, stamp = self.tally, self.clock.now()
        if tally.open_span is not None:
            tally.loop_spans.append([tally.open_span, stamp])
            tally.open_span = None
        elif tally.loop_spans:  # the other requests of the same batch finishing their last step
            tally.loop_spans[-1][1] = stamp


class PeakRss:
    """Peak resident set size of this process while active, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the lifetime peak is the best there is (kB on Linux, B on macOS)
            scale = 1 if platform.system() == "Darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self.peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
