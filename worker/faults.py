"""Fault injection for tests of failure handling: ``BAGEL_JOBS_FAULT_INJECTION``.

Owns: the grammar of that setting (``parse_fault``, used by settings validation, so a bad value
stops start-up), installing a GPU fault on a loaded engine (``install_fault``, called by
``gpu.py`` right after the load) and the API's hook after an upload's object write
(``after_object_write``, called by ``api/routes/files.py``). A GPU fault is a forward pre-hook
on the engine's LLM (``model.language_model``, whose ``forward(x, batch, cache)`` takes ``x`` as
[rows, hidden]): every prefill, decode and denoising forward goes through it, so a fault there
looks to the worker exactly like one raised by a CUDA kernel of that forward. Leaves what to do
about the error to ``gpu.py`` and ``execution.py``, and cleaning up after a killed API to
``orphans.py``.

Values (unset in production; tests set them on a worker or API process):
  ``oom_above_rows:N`` — an LLM forward with more than N packed rows raises
      ``torch.OutOfMemoryError``: a chunk whose packed forward is too big runs out of memory,
      smaller sub-chunks fit;
  ``device_error`` — the first LLM forward, and every later one (a device-side assert poisons
      the CUDA context), raises ``torch.AcceleratorError`` as a device-side assert does;
  ``pause_after_object_write:S`` — an upload that stored its image waits S seconds before it
      records the file row, so a test can kill the API between the two.

Importing this module does not import torch (the settings, and so the API, import it).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bagel.engine import Engine

log = logging.getLogger(__name__)

OOM_ABOVE_ROWS = "oom_above_rows"
DEVICE_ERROR = "device_error"
PAUSE_AFTER_OBJECT_WRITE = "pause_after_object_write"
GPU_FAULTS = (OOM_ABOVE_ROWS, DEVICE_ERROR)
FAULT_FORMS = (f"{OOM_ABOVE_ROWS}:N (N >= 0 packed rows)", DEVICE_ERROR,
               f"{PAUSE_AFTER_OBJECT_WRITE}:S (S > 0 seconds)")


@dataclass(frozen=True)
class Fault:
    """A parsed ``BAGEL_JOBS_FAULT_INJECTION`` value."""

    kind: str
    max_rows: int = 0  # oom_above_rows: the largest forward that still fits
    pause_s: float = 0.0  # pause_after_object_write: how long the upload waits

    def describe(self) -> str:
        if self.kind == OOM_ABOVE_ROWS:
            return f"{self.kind}:{self.max_rows}"
        if self.kind == PAUSE_AFTER_OBJECT_WRITE:
            return f"{self.kind}:{self.pause_s:g}"
        return self.kind


def parse_fault(spec: str) -> Fault:
    """``"oom_above_rows:N"``, ``"device_error"`` or ``"pause_after_object_write:S"`` → ``Fault``;
    anything else raises ``ValueError`` saying what is wrong and which forms are accepted."""
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
    if kind == PAUSE_AFTER_OBJECT_WRITE:
        if not sep:
            raise ValueError(f"{PAUSE_AFTER_OBJECT_WRITE} needs a pause, e.g. '{PAUSE_AFTER_OBJECT_WRITE}:600'")
        try:
            pause_s = float(arg)
        except ValueError:
            pause_s = math.nan
        if not (math.isfinite(pause_s) and pause_s > 0):
            raise ValueError(f"{PAUSE_AFTER_OBJECT_WRITE}: the pause {arg!r} is not a number of seconds > 0")
        return Fault(PAUSE_AFTER_OBJECT_WRITE, pause_s=pause_s)
    raise ValueError(f"unknown fault {kind!r}; use one of {list(FAULT_FORMS)}")


def after_object_write(spec: str | None, key: str) -> None:
    """The upload route's hook between storing ``key`` and committing its file row: under
    ``pause_after_object_write:S`` (``spec`` is the setting) it holds the request there S seconds."""
    if spec is None:
        return
    fault = parse_fault(spec)
    if fault.kind == PAUSE_AFTER_OBJECT_WRITE:
        log.warning("fault injection: %s stored, pausing %g s before its row is committed", key, fault.pause_s)
        time.sleep(fault.pause_s)


def install_fault(engine: Engine, fault: Fault) -> Any:
    """Register ``fault`` on ``engine``'s LLM (a worker keeps it for its life); returns the hook's
    handle, whose ``remove()`` takes it off again, or None for a fault that is not a GPU fault."""
    if fault.kind not in GPU_FAULTS:
        return None
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
