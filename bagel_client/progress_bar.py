"""A one-line text progress bar for ``wait``'s progress callback (no tqdm: the SDK needs only
httpx and standardwebhooks).

Owns: drawing ``label [#########.........] 3/8 jobs 12.4 s`` on a text stream (stderr by
default). On a terminal the line is redrawn in place; elsewhere (a log file, CI) each change is
a line of its own, so the output stays readable. Leaves deciding what ``done`` and ``total``
count to the caller.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``bar = ProgressBar("batch 7f3a")``; ``client.wait(batch, progress=bar)``; ``bar.close()``."""

    def __init__(self, label: str, *, unit: str = "jobs", stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._started = time.monotonic()
        self._is_tty = self.stream.isatty()
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        filled = self.width if total <= 0 else min(self.width, self.width * done // total)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {done}/{total} {self.unit} {time.monotonic() - self._started:.1f} s"
        self.stream.write(f"\r{line}" if self._is_tty else f"{line}\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the redrawn line (on a terminal) so what follows starts on a line of its own."""
        if self._is_tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
