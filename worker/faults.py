"""Fault injection for the GPU worker's failure handling: ``BAGEL_JOBS_FAULT_INJECTION``.

Owns: the grammar of that setting (``parse_fault``, used by settings validation, so a bad value
stops start-up) and installing the fault on a loaded engine (``install_fault``, called by
``gpu.py`` right after the load). The fault is a forward pre-hook on the engine's LLM
(``model.language_model``, whose ``forward(x, batch, cache)`` takes ``x`` as [rows, hidden]):
every prefill, decode and denoising forward goes through it, so a fault there looks to the
worker exactly like one raised by a CUDA kernel of that forward. Leaves what to do about the
error to ``gpu.py`` and ``execution.py``.

Values (unset in production; tests set them on a worker process):
  ``oom_above_rows:N`` — an LLM forward with more than N packed rows raises
      ``torch.OutOfMemoryError``: a chunk whose packed forward is too big runs out of memory,
      smaller sub-chunks fit;
  ``device_error`` — the first LLM forward, and every later one (a device-side assert poisons
      the CUDA context), raises ``torch.AcceleratorError`` as a device-side assert does.

Importing this module does not import torch (the settings, and so the API, import it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bagel.engine import Engine

log = logging.getLogger(__name__)

OOM_ABOVE_ROWS = "oom_above_rows"
DEVICE_ERROR = "device_error"
FAULT_FORMS = (f"{OOM_ABOVE_ROWS}:N (N >= 0 packed rows)", DEVICE_ERROR)


@dataclass(frozen=True)
class Fault:
    """A parsed ``BAGEL_JOBS_FAULT_INJECTION`` value."""

    kind: str
    max_rows: int = 0  # oom_above_rows: the largest forward that still fits

    def describe(self) -> str:
        return f"{self.kind}:{self.max_rows}" if self.kind == OOM_ABOVE_ROWS else self.kind


def parse_fault(spec: str) -> Fault:
    """``"oom_above_rows:N"`` or ``"device_error"`` → ``Fault``; anything else raises
    ``ValueError`` saying what is wrong and which forms are accepted."""
    kind, sep, arg = spec.strip().partition(":")
    if kind == DEVICE_ERROR:
        if sep:
            raise ValueError(f"{DEVICE_ERROR} takes no argument, got {arg!r}")
        return Fault(DEVICE_ERROR)
    if kind == OOM_ABOVE_ROWS:
        if not sep:
            raise ValueError(f"{OOM_ABOVE_ROWS} needs a row limit, e.g. '{OOM_ABOVE_ROWS}:64'")
        if not arg.strip().isdigit():
            raise ValueError(f"{OOM_ABOVE_ROWS}: the row limit {arg!r} is not a whole number >= 0")
        return Fault(OOM_ABOVE_ROWS, int(arg))
    raise ValueError(f"unknown fault {kind!r}; use one of {list(FAULT_FORMS)}")


def install_fault(engine: Engine, fault: Fault) -> Any:
    """Register ``fault`` on ``engine``'s LLM (a worker keeps it for its life); returns the hook's
    handle, whose ``remove()`` takes it off again."""
    import torch

    def raise_fault(module: Any, args: tuple[Any, ...]) -> None:
        rows = int(args[0].shape[0])
        if fault.kind == DEVICE_ERROR:
            raise torch.AcceleratorError("CUDA error: device-side assert triggered (injected fault)")
        if rows > fault.max_rows:
            log.warning("fault injection: out of memory for a forward of %d packed rows (limit %d)",
                        rows, fault.max_rows)
            raise torch.OutOfMemoryError(f"injected fault: a forward of {rows} packed rows exceeds "
                                         f"the {fault.max_rows}-row limit of {OOM_ABOVE_ROWS}")

    handle = engine.model.language_model.register_forward_pre_hook(raise_fault)
    log.warning("!!! fault injection %s is active on this worker (BAGEL_JOBS_FAULT_INJECTION): "
                "for tests only !!!", fault.describe())
    return handle
