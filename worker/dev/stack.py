"""``bagel-jobs up``: the whole embedded stack on one machine, as child processes.

Owns: starting the API, one GPU worker, one webhook worker and the reconciler with the same
environment, forwarding Ctrl-C/SIGTERM to all of them, and stopping everything when one child
exits unexpectedly (a half-running stack is worse than a stopped one). Runs the migrations
first so a fresh folder works. Leaves each process's work to its own command in ``cli.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0
POLL_S = 0.2


def _commands(log_level: str) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "worker.cli", "--log-level", log_level]
    return {
        "api": [*base, "api"],
        "gpu-worker": [*base, "worker", "--queues", "gpu"],
        "webhook-worker": [*base, "worker", "--queues", "webhooks"],
        "reconciler": [*base, "reconciler"],
    }


def stop_children(children: dict[str, subprocess.Popen[bytes]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live child, wait up to ``grace_s``, then SIGKILL the stragglers."""
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for name, proc in children.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
            proc.kill()
            proc.wait()


def run_stack(settings: Settings, *, log_level: str = "info") -> int:
    """Run until a signal arrives or a child dies; returns the exit status."""
    from worker import db

    db.upgrade(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    children: dict[str, subprocess.Popen[bytes]] = {}
    status = 0
    try:
        for name, cmd in _commands(log_level).items():
            children[name] = subprocess.Popen(cmd, env=os.environ.copy())
            log.info("started %s (pid %d)", name, children[name].pid)
        log.info("embedded stack up: API on http://%s:%d (docs at /docs); Ctrl-C stops it",
                 settings.api_host, settings.api_port)
        while not stop.wait(POLL_S):
            dead = {n: p.returncode for n, p in children.items() if p.poll() is not None}
            if dead:
                log.error("stopping the stack: %s exited", dead)
                status = 1
                break
    finally:
        stop_children(children)
        log.info("embedded stack stopped")
    return status
