"""The record of one check: its status, reason, time, figures and assertions.

Owns: ``Record`` (what a check writes while it runs and what the report shows of it), the
rule that turns its assertions into a status, and ``Skip`` (raised by a check that cannot run
here, with the reason). Leaves running checks to ``runner.py``.

Status: ``fail`` when the check raised or an assertion failed (the reason names the first);
``skipped`` when it was not started (time budget, a missing package, an engine that did not
load) or when every assertion it has needs CUDA and the device is not one (``needs CUDA``);
``pass`` otherwise — a timing has no assertion and passes when it ran. A CUDA-only assertion
of a check that has others is listed under ``assertions`` with ``ok`` None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NEEDS_CUDA = "needs CUDA"
TIME_BUDGET = "time budget"


class Skip(Exception):
    """Raised when a check cannot run here; the message is the reason."""


@dataclass
class Record:
    """One check in the report."""

    name: str
    planned_s: float = 0.0
    status: str = "pass"
    reason: str | None = None
    seconds: float = 0.0
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    assertions: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def figure(self, **values: Any) -> None:
        self.figures.update(values)

    def expect(self, what: str, ok: bool, detail: str = "") -> bool:
        """Record an assertion (``what`` states the requirement, ``detail`` the measured values)."""
        self.assertions.append({"what": what, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def cuda_only(self, what: str) -> None:
        """Record an assertion that needs CUDA as not checked on this device."""
        self.assertions.append({"what": what, "ok": None, "detail": NEEDS_CUDA})

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason

    def fail(self, reason: str, error: str | None = None) -> None:
        self.status, self.reason, self.error = "fail", reason, error

    def settle(self) -> None:
        """The status once the check has returned (see the module docstring)."""
        if self.status != "pass":
            return
        failed = [a for a in self.assertions if a["ok"] is False]
        unchecked = [a["what"] for a in self.assertions if a["ok"] is None]
        if failed:
            first = failed[0]
            self.fail(f"{first['what']}: {first['detail']}" if first["detail"] else first["what"])
        elif unchecked and len(unchecked) == len(self.assertions):
            self.skip(NEEDS_CUDA)
        elif unchecked:
            self.summary += f" [{NEEDS_CUDA}, not checked: {'; '.join(unchecked)}]"

    @property
    def label(self) -> str:
        """The status as the table shows it: ``pass``, ``FAIL`` or ``skipped: <reason>``."""
        if self.status == "skipped":
            return f"skipped: {self.reason}"
        return "FAIL" if self.status == "fail" else "pass"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason,
                "seconds": round(self.seconds, 3), "planned_s": round(self.planned_s, 3), "summary": self.summary,
                "figures": self.figures, "assertions": self.assertions, "error": self.error}
