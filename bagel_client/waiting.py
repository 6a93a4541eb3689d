"""How ``wait`` polls and reports progress, shared by ``Client`` and ``AsyncClient``.

Owns: the polling schedule (from ``poll_s``, growing by half each time up to ``max_poll_s``,
never past the deadline), what ``progress(done, total)`` counts, and when it is called.
Leaves the reads and the sleeping to the clients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from bagel_client.models import Batch, Job

ProgressCallback: TypeAlias = Callable[[int, int], None]


@dataclass
class Poller:
    """The schedule and progress reporting of one ``wait``: polls start at ``poll_s`` and grow
    by half each time up to ``max_poll_s``; ``progress(done, total)`` is called with the first
    reading and then whenever it changes (done only grows for a batch: jobs finished; for a
    job: denoising steps, ``total`` of ``total`` once it finished)."""

    poll_s: float
    max_poll_s: float
    timeout_s: float | None
    progress: ProgressCallback | None
    started: float
    _delay: float = field(init=False)
    _last: tuple[int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.poll_s <= 0 or self.max_poll_s < self.poll_s:
            raise ValueError(f"poll_s: {self.poll_s} must be > 0 and at most max_poll_s ({self.max_poll_s})")
        self._delay = self.poll_s

    def seen(self, target: Job | Batch) -> bool:
        """Report ``target``'s progress; True once it finished."""
        done, total = progress_of(target)
        if self.progress is not None and (done, total) != self._last:
            self._last = (done, total)
            self.progress(done, total)
        return target.is_completed if isinstance(target, Batch) else target.is_terminal

    def next_delay(self, now: float) -> float | None:
        """Seconds to sleep before the next poll, or None once ``timeout_s`` has passed."""
        if self.timeout_s is not None:
            left = self.started + self.timeout_s - now
            if left <= 0:
                return None
            delay = min(self._delay, left)
        else:
            delay = self._delay
        self._delay = min(self.max_poll_s, self._delay * 1.5)
        return delay


def progress_of(target: Job | Batch) -> tuple[int, int]:
    if isinstance(target, Batch):
        return target.finished, target.job_count
    total = target.progress.total
    if total <= 0:  # understand: no denoising steps to count
        return (1 if target.is_terminal else 0), 1
    return (total if target.status == "succeeded" else min(target.progress.step, total)), total


def timeout_message(target: Job | Batch, timeout_s: float | None) -> str:
    kind = "batch" if isinstance(target, Batch) else "job"
    done, total = progress_of(target)
    return f"{kind} {target.id}: not finished within {timeout_s} s ({done} of {total} done, status {target.status})"
