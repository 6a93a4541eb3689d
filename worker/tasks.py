"""The Celery tasks, thin: each takes ids, calls plain functions and returns nothing.

Owns: task registration on an app (``register``) and the per-process runtime the tasks share
(``WorkerRuntime``: settings, DB sessions, result store, engine holder, worker id, shutdown
flag). Leaves chunk execution to ``execution.py``, delivery to ``webhooks.py`` and recovery to
``reconciler.py``. A repeated message is harmless: claims are conditional and result keys are
deterministic.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

from worker.celery_app import DELIVER_WEBHOOKS, RUN_CHUNK

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.orm import Session

    from worker.gpu import EngineHolder
    from worker.settings import Settings
    from worker.storage import ResultStore

log = logging.getLogger(__name__)


class WorkerRuntime:
    """What one worker process holds for its whole life. Built lazily so that a publisher-only
    app (the API) never opens the database or storage through it."""

    def __init__(self, settings: Settings, engine_holder: EngineHolder | None = None) -> None:
        self.settings = settings
        self.engine_holder = engine_holder
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.shutting_down = threading.Event()
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
        from worker.execution import run_chunk as execute

        execute(runtime(self.app), chunk_id)

    @app.task(name=DELIVER_WEBHOOKS, bind=True, ignore_result=True)
    def deliver_webhooks(self: Any) -> None:
        from worker.webhooks import deliver_due

        rt = runtime(self.app)
        deliver_due(rt.settings, rt.session, rt.store)
