"""What the checks of one ``gpu-check`` run share: the device, the scale, the one engine alive,
the cost model and the figures later checks compare with.

Owns: ``Session`` and ``EngineSlot`` — at most one engine at a time (a full-size bf16 engine
holds 27 GiB; two would skew every memory figure), loaded from a random checkpoint of the
size's real shapes straight on the device (``tiny.random_checkpoint``, the path
``Engine.random`` takes), with the transforms' minimum picture sides lowered for the CPU sizes
(as ``bagel bench`` does) — and ``free_memory``, run between checks. Leaves the checks to the
check modules.

The work dtype is bfloat16 on CUDA (the real weights' dtype) and float32 on the CPU (its
kernels; the dry run checks the code, not the numbers). A load that failed is remembered: the
checks that need that engine are skipped with its error instead of loading it again.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from bagel.engine import Engine
from bagel.loading import LoadedCheckpoint, paper_weight_bytes
from bagel.tiny import preset_config, random_checkpoint
from gpu_check.plan import SCALES, Costs, Scale
from gpu_check.record import Skip

log = logging.getLogger(__name__)

CHECKPOINT_SEED = 0
QUANTIZED = ("nf4", "int8")


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand the allocator's cached blocks back (CUDA), then restart the
    peak-memory statistics, so the next check starts from what is really alive."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def size_text(n: int) -> str:
    """``n`` bytes as GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lower_min_sides(checkpoint: LoadedCheckpoint, px: int | None) -> LoadedCheckpoint:
    """The same weights with the transforms' minimum picture sides lowered to ``px`` (None:
    unchanged), so a small picture keeps its size on a CPU dry run."""
    if px is None:
        return checkpoint
    consts = checkpoint.config.constants
    consts = replace(consts, vae_min_px=min(consts.vae_min_px, px), vit_min_px=min(consts.vit_min_px, px))
    return replace(checkpoint, config=replace(checkpoint.config, constants=consts))


@dataclass
class LoadFacts:
    """One load as the load check reports it."""

    quantization: str
    dtype: torch.dtype
    seconds: float
    weight_bytes: int
    allocated_before: int | None
    allocated_after: int | None


class EngineSlot:
    """Holds at most one engine; ``get`` swaps engines, ``load`` always loads afresh. An engine
    is keyed by its quantization, dtype and offload mode."""

    def __init__(self, scale: Scale, device: torch.device) -> None:
        self.scale = scale
        self.device = device
        self.engine: Engine | None = None
        self.key: tuple[str, torch.dtype, str] | None = None
        self.failures: dict[tuple[str, torch.dtype, str], str] = {}

    @property
    def work_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def holds(self, quantization: str, dtype: torch.dtype | None = None, offload: str = "none") -> bool:
        return self.key == (quantization, dtype or self.work_dtype, offload)

    def drop(self) -> None:
        self.engine, self.key = None, None
        free_memory(self.device)

    def load(self, quantization: str, dtype: torch.dtype, offload: str = "none") -> LoadFacts:
        """Drop the engine held, load a fresh one and keep it; raises what the load raised."""
        self.drop()
        before = allocated_bytes(self.device)
        key = (quantization, dtype, offload)
        started = time.perf_counter()
        try:
            checkpoint = random_checkpoint(self.scale.size, device=self.device, dtype=dtype,
                                           quantization=quantization, seed=CHECKPOINT_SEED, offload=offload)
            engine = Engine(lower_min_sides(checkpoint, self.scale.min_side_px))
        except Exception as exc:
            self.failures[key] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        self.engine, self.key = engine, key
        self.failures.pop(key, None)
        return LoadFacts(quantization, dtype, seconds, engine.checkpoint.weight_bytes, before,
                         allocated_bytes(self.device))

    def get(self, quantization: str = "none", offload: str = "none") -> Engine:
        """The engine of ``quantization`` (and ``offload``) in the work dtype, loaded if another
        one is held."""
        key = (quantization, self.work_dtype, offload)
        if self.key == key and self.engine is not None:
            return self.engine
        if key in self.failures:
            label = dtype_name(key[1]) if quantization == "none" else f"{quantization} ({dtype_name(key[1])})"
            label += "" if offload == "none" else f", offload {offload}"
            raise Skip(f"the {label} engine did not load ({self.failures[key]})")
        self.load(quantization, self.work_dtype, offload)
        return self.engine


@dataclass
class Session:
    """State shared by the checks of one run."""

    device: torch.device
    scale: Scale
    slot: EngineSlot
    costs: Costs
    measured: dict[str, float] = field(default_factory=dict)  # e.g. batched try-on s/image, for ratios

    @classmethod
    def create(cls, device: torch.device, size: str) -> Session:
        scale = SCALES[size]
        return cls(device, scale, EngineSlot(scale, device), Costs(device.type))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return self.slot.work_dtype

    @cached_property
    def config(self):
        """The size's architecture (for plans, before any engine is loaded)."""
        return preset_config(self.scale.size, 256)

    @cached_property
    def weight_bytes(self) -> dict[str, int]:
        """Paper weight bytes of a load in each quantization mode (bf16), for plans."""
        return {q: paper_weight_bytes(self.config, quantization=q) for q in ("none", *QUANTIZED)}

    @cached_property
    def bitsandbytes_missing(self) -> str | None:
        """None when bitsandbytes imports, else why not."""
        try:
            importlib.import_module("bitsandbytes")
        except Exception as exc:  # an ImportError, or a broken native library raising at import
            return f"{type(exc).__name__}: {exc}"
        return None

    def load_plan_s(self, quantization: str) -> float:
        """Planned seconds to have the ``quantization`` work engine (0 when it is held)."""
        if self.slot.holds(quantization):
            return 0.0
        return self.costs.load_seconds(self.weight_bytes[quantization], quantization)
