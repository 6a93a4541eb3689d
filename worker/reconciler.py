"""The reconciler: periodic repair that makes the database, not the broker, the source of truth.

Owns: one ``reconcile_once`` pass and the ``run_forever`` loop around it. A pass
1. returns ``running`` jobs whose lease expired (worker killed, machine gone) to waiting (or
   ``failed``/``lease_expired`` when their attempts are used up), for the dispatcher
   (``scheduler.py``, which also repairs lost broker messages) to hand out again;
2. deletes result objects older than ``result_retention_s`` and marks those jobs;
3. nudges the webhook worker when outbox rows are due (retries after backoff);
4. when asked (``run_forever`` asks on its first pass and then every ``orphan_sweep_interval_s``),
   deletes stored objects that no row holds (``orphans.py``).
Each step is isolated: one failing (e.g. the broker is down) does not stop the others. Leaves
every state change to ``worker.jobs``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select

from worker import dispatch, jobs
from worker.errors import BrokerUnavailable, StorageUnavailable
from worker.models import DeliveryStatus, WebhookDelivery, result_keys, utcnow
from worker.orphans import sweep_orphans
from worker.queues import WEBHOOK_QUEUE

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings
    from worker.storage import ResultStore

log = logging.getLogger(__name__)

@dataclass
class PassReport:
    """What one pass did (logged, and asserted on by tests)."""

    requeued: int = 0
    expired: int = 0
    nudged: bool = False
    orphans: int = 0  # objects that no row holds, deleted
    errors: int = 0


def reconcile_once(settings: Settings, session: Callable[[], Session], store: ResultStore, *,
                   sweep: bool = False) -> PassReport:
    """One repair pass, with the orphan sweep when ``sweep``; never raises (each failure is
    logged and counted)."""
    report = PassReport()
    try:
        with session() as s:
            report.requeued = jobs.requeue_expired(s, utcnow())
        if report.requeued:
            log.warning("reconciler: %d job(s) with an expired lease back to queued", report.requeued)
    except Exception:  # noqa: BLE001 - the loop must survive a database outage
        report.errors += 1
        log.exception("reconciler: requeueing expired leases failed")

    try:
        report.expired = _expire_results(settings, session, store)
    except Exception:  # noqa: BLE001
        report.errors += 1
        log.exception("reconciler: expiring results failed")

    try:
        with session() as s:  # a plain read: due_deliveries would claim the row
            due = s.scalar(select(WebhookDelivery.id).where(
                WebhookDelivery.status == DeliveryStatus.pending,
                WebhookDelivery.next_attempt_at <= utcnow()).limit(1))
        # One waiting nudge is enough: a stopped webhook worker must not pile them up.
        if due is not None and dispatch.queue_length(settings, WEBHOOK_QUEUE) == 0:
            dispatch.nudge_webhooks(settings)
            report.nudged = True
    except BrokerUnavailable as exc:
        report.errors += 1
        log.warning("reconciler: webhook nudge not sent: %s", exc)
    except Exception:  # noqa: BLE001
        report.errors += 1
        log.exception("reconciler: checking the webhook outbox failed")

    if sweep:
        try:
            swept = sweep_orphans(session, store, settings.orphan_grace_s)
            report.orphans = swept.inputs + swept.results
        except StorageUnavailable as exc:
            report.errors += 1
            log.warning("reconciler: orphan sweep stopped, the next one tries again: %s", exc)
        except Exception:  # noqa: BLE001 - e.g. the database is down: the next sweep tries again
            report.errors += 1
            log.exception("reconciler: sweeping orphan objects failed")
    return report


def _expire_results(settings: Settings, session: Callable[[], Session], store: ResultStore) -> int:
    with session() as s:
        expired = [(j.id, j.dedupe_of or j.id, result_keys(j.output_key, j.quality)) for j in
                   jobs.expired_results(s, utcnow(), settings.result_retention_s)]
    for job_id, maker_id, keys in expired:
        with session() as s:  # a result answers its maker's twins too: the last one to expire deletes it
            shared = jobs.result_still_held(s, maker_id, job_id)
        if not shared:
            for key in sorted(keys):
                store.delete(key)
        with session() as s:
            jobs.mark_result_expired(s, job_id)
    if expired:
        log.info("reconciler: expired %d result(s) older than %d s", len(expired), settings.result_retention_s)
    return len(expired)


def run_forever(settings: Settings, session: Callable[[], Session], store: ResultStore,
                stop: threading.Event) -> None:
    """Run a pass every ``reconcile_interval_s`` until ``stop`` is set; the first pass and then
    one every ``orphan_sweep_interval_s`` also sweep orphan objects."""
    log.info("reconciler started: every %.1f s, orphan sweep every %.1f s", settings.reconcile_interval_s,
             settings.orphan_sweep_interval_s)
    next_sweep = time.monotonic()  # the first pass sweeps: orphans of a crash before this start
    while not stop.is_set():
        sweep = time.monotonic() >= next_sweep
        if sweep:
            next_sweep = time.monotonic() + settings.orphan_sweep_interval_s
        report = reconcile_once(settings, session, store, sweep=sweep)
        if report.requeued or report.expired or report.orphans or report.errors:
            log.info("reconciler pass: %s", report)
        stop.wait(settings.reconcile_interval_s)
    log.info("reconciler stopped")
