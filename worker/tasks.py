"""The Celery tasks, thin: each takes ids, calls plain functions and returns nothing.

Owns: task registration on an app (``register``), the per-process runtime the tasks share
(``WorkerRuntime``: settings, DB sessions, result store, engine holder, worker id, shutdown
flag) and ending the process after a device error. Leaves chunk execution to ``execution.py``,
delivery to ``webhooks.py`` and recovery to ``reconciler.py``. A repeated message is harmless:
claims are conditional and result keys are deterministic.

Ending the process after a device error (the chunk is already back in the queue, see
``execution.py``): the task sets Celery's warm-shutdown flag (``celery.worker.state.should_stop``,
what Celery's own SIGTERM handler sets) to ``DEVICE_ERROR_EXIT_CODE`` and returns normally, so
Celery acks the late-acked message first. The consumer loop then raises ``WorkerShutdown`` with
that code, the worker stops with it as ``exitcode`` and ``bagel-jobs worker`` exits with it (a
plain ``celery worker`` too); the supervisor (compose ``restart``, Kubernetes) starts a clean
process. Celery's blocking loop may still deliver one more message while it stops: a
``run_chunk`` arriving then is rejected back to the queue untouched, never run on the broken
device.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from worker.queues import DELIVER_WEBHOOKS, RUN_CHUNK
from worker.errors import DeviceFailure
from worker.logs import log_context
from worker.outages import StorageGate
from worker.worker_http import WorkerStats

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session

    from worker.gpu import EngineHolder
    from worker.registry import Registration
    from worker.settings import Settings
    from worker.storage import ResultStore

log = logging.getLogger(__name__)

# The worker's exit status after a device error: non-zero, and distinct from the CLI's 1 (a
# service error) and 2 (bad settings), so an operator can tell a GPU fault from a misconfiguration.
DEVICE_ERROR_EXIT_CODE = 3


class WorkerRuntime:
    """What one worker process holds for its whole life. Built lazily so that a publisher-only
    app (the API) never opens the database or storage through it."""

    def __init__(self, settings: Settings, engine_holder: EngineHolder | None = None) -> None:
        self.settings = settings
        self.engine_holder = engine_holder
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.shutting_down = threading.Event()
        self.exit_code: int | None = None  # set when this process must end (a device error)
        self.registration: Registration | None = None  # a GPU worker's registry row (registry.py)
        self.stats = WorkerStats()  # what its /livez, /readyz and /metrics report (worker_http.py)
        self.last_chunk_end: float | None = None  # perf_counter() when its last chunk ended (execution.py)
        self.storage_gate = StorageGate()  # blocked while its storage is unreachable (outages.py)
        self._lock = threading.Lock()
        self._session_factory: Any = None
        self._store: ResultStore | None = None

    def session(self) -> Session:
        with self._lock:
            if self._session_factory is None:
                from worker.db import make_engine, session_factory

                self._session_factory = session_factory(make_engine(self.settings))
        return self._session_factory()

    @property
    def store(self) -> ResultStore:
        with self._lock:
            if self._store is None:
                from worker.storage import make_store

                self._store = make_store(self.settings)
            return self._store

    def holder(self) -> EngineHolder:
        with self._lock:
            if self.engine_holder is None:
                # A worker started without the CLI (e.g. `celery worker`) loads the engine on its
                # first chunk instead of at start-up.
                from worker.gpu import EngineHolder

                self.engine_holder = EngineHolder(self.settings)
        self.engine_holder.load()
        return self.engine_holder


def runtime(app: Celery) -> WorkerRuntime:
    """The app's runtime, created on first use."""
    rt = getattr(app, "bagel_runtime", None)
    if rt is None:
        rt = WorkerRuntime(app.bagel_settings)
        app.bagel_runtime = rt
    return rt


def register(app: Celery) -> None:
    """Attach the three bagel-jobs tasks to ``app``."""

    @app.task(name=RUN_CHUNK, bind=True, ignore_result=True, acks_late=True)
    def run_chunk(self: Any, chunk_id: str) -> None:
        from celery.exceptions import Reject

        from worker.execution import run_chunk as execute

        rt = runtime(self.app)
        if rt.exit_code is not None:
            raise Reject(f"chunk {chunk_id}: worker {rt.worker_id} is exiting after a device error",
                         requeue=True)
        steps_before, started = rt.stats.total_steps, time.monotonic()
        outcome = "done"
        try:
            with log_context(chunk_id=chunk_id, worker_id=rt.worker_id):
                execute(rt, chunk_id)
        except DeviceFailure:
            outcome = "device_error"
            end_worker(rt, DEVICE_ERROR_EXIT_CODE)
        except BaseException:
            outcome = "error"
            raise
        finally:
            elapsed = max(time.monotonic() - started, 1e-9)
            rt.stats.chunk_finished(outcome, (rt.stats.total_steps - steps_before) / elapsed)
            if rt.registration is not None:
                rt.registration.set_chunk(None)

    @app.task(name=DELIVER_WEBHOOKS, bind=True, ignore_result=True)
    def deliver_webhooks(self: Any) -> None:
        from worker.webhooks import deliver_due

        rt = runtime(self.app)
        deliver_due(rt.settings, rt.session, rt.store)


def end_worker(rt: WorkerRuntime, exit_code: int) -> None:
    """Make the Celery worker running this task stop with ``exit_code`` once the task returns
    and its message is acked (see the module docstring)."""
    from celery.worker import state

    rt.exit_code = exit_code
    state.should_stop = exit_code
    log.error("worker %s: the device is unusable; stopping with exit status %d for the supervisor to "
              "start a clean process", rt.worker_id, exit_code)
