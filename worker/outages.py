"""A GPU worker riding out an unavailable dependency: storage, database or broker.

Owns: telling an outage from the job's own failure (``outage_code``), the backoff between a
job's tries while a dependency is down (``outage_delay_s``: capped exponential with jitter; no
attempt is counted — ``jobs.defer_job``), waiting for the database to answer again
(``until_database``), and the storage gate (``StorageGate``): once storage fails, the worker is
``blocked`` — its ``/readyz`` answers 503 and the dispatcher stops counting it — and it takes no
chunk until a probe (``ResultStore.check``) succeeds, so one outage does not burn through the
queue. Outputs computed before an upload failed are kept by ``execution.py`` while it waits
here, not recomputed. Leaves the job transitions to ``jobs.py`` and the chunk's flow to
``execution.py``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from worker.errors import BrokerUnavailable, DatabaseUnavailable, StorageUnavailable
from worker.models import WorkerState

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings
    from worker.tasks import WorkerRuntime

log = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_PROBE_S = 0.5  # the first wait before probing a dependency again; doubles up to the cap
DATABASE_ERRORS = (OperationalError, InterfaceError, DatabaseUnavailable)


def outage_code(exc: BaseException) -> str | None:
    """The error code when ``exc`` means a dependency is unavailable, else None (the job's own
    failure, which spends an attempt)."""
    if isinstance(exc, StorageUnavailable):
        return StorageUnavailable.code
    if isinstance(exc, BrokerUnavailable):
        return BrokerUnavailable.code
    if isinstance(exc, DATABASE_ERRORS):
        return DatabaseUnavailable.code
    return None


def outage_delay_s(settings: Settings, deferrals: int) -> float:
    """Wait before a job's try number ``deferrals + 1`` while a dependency is down:
    ``retry_backoff_s``·2^deferrals capped at ``outage_backoff_max_s``, then full jitter over its
    upper half (jobs deferred together do not all come back at once)."""
    capped = min(settings.retry_backoff_s * (2 ** min(deferrals, 30)), settings.outage_backoff_max_s)
    return capped * random.uniform(0.5, 1.0)


def _next_wait(wait_s: float, settings: Settings) -> float:
    return min(wait_s * 2, settings.outage_backoff_max_s)


def until_database(rt: WorkerRuntime, work: Callable[[Session], T], what: str) -> T:
    """Run ``work`` in a session, again after a backoff for as long as the database is
    unavailable, up to ``outage_budget_s`` (then the error is raised). A restart of the database
    thus delays a worker's writes instead of losing them."""
    deadline = time.monotonic() + rt.settings.outage_budget_s
    wait_s = FIRST_PROBE_S
    while True:
        try:
            with rt.session() as session:
                return work(session)
        except DATABASE_ERRORS as exc:
            if time.monotonic() + wait_s > deadline:
                raise
            log.warning("database unavailable while %s (%s: %s); trying again in %.1f s", what,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", wait_s)
            time.sleep(wait_s)
            wait_s = _next_wait(wait_s, rt.settings)


class StorageGate:
    """Whether this worker can reach its storage. Once an operation fails, the worker is
    ``blocked`` and a probe thread checks the store with a capped backoff until it answers —
    then the worker is ``ready`` again, whether or not a message is waiting for it (a blocked
    worker is out of the dispatcher's count, so none may come)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._up.set()
        self._prober: threading.Thread | None = None

    @property
    def blocked(self) -> bool:
        return not self._up.is_set()

    def down(self, rt: WorkerRuntime, reason: str) -> None:
        """Storage failed: readiness 503 and the registry row ``blocked`` until a probe succeeds."""
        with self._lock:
            self._up.clear()
            rt.stats.set_blocked(f"storage unreachable: {reason}")
            if self._prober is not None and self._prober.is_alive():
                return
            self._prober = threading.Thread(target=self._probe_until_up, args=(rt,), name="storage-probe",
                                            daemon=True)
            self._prober.start()
        log.error("worker %s: storage unreachable (%s); taking no chunk until it answers", rt.worker_id, reason)
        self._set_state(rt, WorkerState.blocked)

    def wait_until_up(self, rt: WorkerRuntime, deadline: float | None = None) -> bool:
        """Wait until storage answers; True then, False if the worker was told to stop or
        ``deadline`` (``time.monotonic()``) passed first. At once when storage is not known down."""
        while not self._up.wait(FIRST_PROBE_S):
            if rt.shutting_down.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return False
        return True

    def _probe_until_up(self, rt: WorkerRuntime) -> None:
        wait_s = FIRST_PROBE_S
        while True:
            time.sleep(wait_s)
            try:
                rt.store.check()
            except Exception as exc:  # noqa: BLE001 - whatever the store raises, it is not back yet
                rt.stats.set_blocked(f"storage unreachable: {exc}")
                wait_s = _next_wait(wait_s, rt.settings)
                continue
            break
        with self._lock:
            self._up.set()
            rt.stats.set_blocked(None)
        log.warning("worker %s: storage answers again; taking chunks", rt.worker_id)
        self._set_state(rt, WorkerState.draining if rt.shutting_down.is_set() else WorkerState.ready)

    @staticmethod
    def _set_state(rt: WorkerRuntime, state: WorkerState) -> None:
        if rt.registration is None:
            return
        try:
            rt.registration.set_state(state)
        except Exception:  # noqa: BLE001 - the heartbeat writes the state at its next beat
            log.warning("worker %s: could not record state %s now; the heartbeat will", rt.worker_id, state.value)
