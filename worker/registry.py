"""The GPU worker registry: each GPU worker process keeps one ``workers`` row alive.

Owns: registering a worker (state ``loading`` while its engine loads, ``ready`` once it can take
chunks, with its model's identity, ``draining`` from the moment it is told to stop), a heartbeat thread refreshing
``last_seen`` and the chunk it runs every ``worker_heartbeat_s``, and removing the row on a clean
exit. The dispatcher counts ready workers heard from within ``worker_dead_after_s`` to size its
window; a worker that dies simply stops being counted. Leaves the use of the count to
``scheduler.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import delete, update

from worker.models import Worker, WorkerState, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings
    from worker.worker_http import WorkerStats

log = logging.getLogger(__name__)


class Registration:
    """One worker's row and its heartbeat."""

    def __init__(self, settings: Settings, session: Callable[[], Session], worker_id: str,
                 stats: WorkerStats | None = None) -> None:
        self.settings = settings
        self.stats = stats  # told whether the heartbeat runs (the worker's /livez)
        self.session = session
        self.worker_id = worker_id
        self.state = WorkerState.loading
        self.chunk_id: str | None = None
        self.identity: tuple[str, str] | None = None  # (weights_sha256, quantization) once loaded
        self.sessions: list[str] = []  # sessions whose context it holds (``worker.session_cache``)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, name="worker-heartbeat", daemon=True)

    def start(self) -> None:
        """Insert the row (``loading``) and start the heartbeat."""
        now = utcnow()
        with self.session() as s:
            s.execute(delete(Worker).where(Worker.id == self.worker_id))
            s.add(Worker(id=self.worker_id, state=self.state, started_at=now, last_seen=now))
            s.commit()
        self._thread.start()
        log.info("worker %s registered", self.worker_id)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def set_state(self, state: WorkerState) -> None:
        """Change the state now (not at the next beat: a draining worker must stop being counted)."""
        self.state = state
        self._beat()

    def set_ready(self, weights_sha256: str, quantization: str) -> None:
        """The engine is loaded: record its model's identity (``worker.dedupe`` reuses a finished
        job's result only while every live worker runs the same model) and start taking chunks."""
        self.identity = (weights_sha256, quantization)
        self.set_state(WorkerState.ready)

    def set_sessions(self, session_ids: list[str]) -> None:
        """The sessions whose context the worker now holds: the dispatcher sends their next turns
        here first (``scheduler.py``). Written now, not at the next beat."""
        if session_ids != self.sessions:
            self.sessions = list(session_ids)
            self._beat()

    def set_chunk(self, chunk_id: str | None) -> None:
        self.chunk_id = chunk_id

    def stop(self) -> None:
        """Stop the heartbeat and remove the row."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.settings.worker_heartbeat_s + 5)
        try:
            with self.session() as s:
                s.execute(delete(Worker).where(Worker.id == self.worker_id))
                s.commit()
        except Exception:  # noqa: BLE001 - a dead row ages out of the live count by itself
            log.warning("worker %s: could not remove its registry row", self.worker_id, exc_info=True)

    def _beat(self) -> None:
        with self.session() as s:
            s.execute(update(Worker).where(Worker.id == self.worker_id)
                      .values(state=self.state, last_seen=utcnow(), current_chunk_id=self.chunk_id,
                              weights_sha256=self.identity[0] if self.identity else None,
                              quantization=self.identity[1] if self.identity else None,
                              sessions=list(self.sessions))
                      .execution_options(synchronize_session=False))
            s.commit()

    def _beat_loop(self) -> None:
        if self.stats is not None:
            self.stats.heartbeat_alive(True)
        try:
            while not self._stop.wait(self.settings.worker_heartbeat_s):
                try:
                    self._beat()
                except Exception:  # noqa: BLE001 - the database may be restarting; beat again later
                    log.warning("worker %s: heartbeat failed", self.worker_id, exc_info=True)
        finally:
            if self.stats is not None:
                self.stats.heartbeat_alive(False)
