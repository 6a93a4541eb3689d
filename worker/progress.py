"""Batch reports while a batch runs: throttled ``batch.progress`` events and the report cursor
the manifest (``GET /v1/batches/{id}/manifest?since=N``) is read back with.

Owns: when a batch reports, numbering its reports, marking each job with the report that first
counted it final, the ``batch.progress`` payload, and reading a batch's manifest rows by
position and by report. Leaves job transitions to ``jobs.py`` (which calls ``report_batch`` after
each one, in its transaction), outbox rows and ``batch.completed`` to ``outbox.py``, and the
response shapes to ``api/``.

Reports. A batch submitted with a ``progress_interval_s`` (the ``batch_progress_interval_s``
setting at submission) writes a ``batch.progress`` event when one of its jobs finishes
(succeeded, failed, canceled, expired) and none was written in the last ``progress_interval_s``
— the first finish reports at once. The last job's finish completes the batch instead
(``batch.completed``, never a progress event after it). Each report takes the next number
(``batches.report_seq``: 1, 2, …; batch.completed takes the last one) and stamps it on every
final job no earlier report counted (``jobs.report_seq``), so ``since=N`` lists exactly the jobs
reported after report N — nothing new is missed, however the finishes interleave.

No race between two workers finishing jobs of one batch at once: each transition holds the batch
row lock (``outbox.lock_batch``, taken before any outbox insert) and reads the batch row fresh
under it, and the report itself is one conditional UPDATE on the number it read (``WHERE
report_seq = n AND completed_at IS NULL``), so of two transactions that both find a report due
exactly one writes it; SQLite serializes writers anyway. A job finished by a transaction that is
still waiting for the lock is not yet final to the report's statements, and is stamped by a
later report or by the completion. The throttle compares the transition's own clock with the
last report's time: workers' clock skew only shifts the interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker import outbox, queries
from worker.models import TERMINAL_STATUSES, Batch, Job, JobStatus

log = logging.getLogger(__name__)

MANIFEST_PATH = "/v1/batches/{batch_id}/manifest"

_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class Report:
    """One report of a batch: its number and how many jobs it counted final for the first time."""

    seq: int
    newly_done: int


def report_batch(session: Session, batch_id: str, now: datetime) -> None:
    """After a job of the batch finished (in the same transaction): ``batch.completed`` when no
    job is left active, else a ``batch.progress`` event when one is due. The caller commits."""
    if outbox.complete_batch_if_done(session, batch_id, now):
        batch = outbox.lock_batch(session, batch_id)
        assert batch is not None
        _take_report(session, batch, now, completing=True)
        return
    batch = outbox.lock_batch(session, batch_id)
    if batch is None or batch.completed_at is not None or not is_report_due(batch, now):
        return
    report = _take_report(session, batch, now, completing=False)
    if report is None:
        return
    counts = queries.batch_counts(session, batch_id)
    data = progress_payload(batch, counts, report)
    log.info("batch %s report %d: %d of %d job(s) done", batch_id, report.seq, data["done"], data["total"])
    if batch.webhook_url:
        outbox.add_delivery(session, batch.tenant_id, outbox.EVENT_BATCH_PROGRESS, batch.webhook_url, data, now,
                            batch_id=batch_id)


def is_report_due(batch: Batch, now: datetime) -> bool:
    """Whether a finish at ``now`` reports: the batch reports at all, and its last
    ``batch.progress`` (if any) is at least ``progress_interval_s`` old."""
    if batch.progress_interval_s is None:
        return False
    return batch.reported_at is None or (now - batch.reported_at).total_seconds() >= batch.progress_interval_s


def _take_report(session: Session, batch: Batch, now: datetime, *, completing: bool) -> Report | None:
    """The batch's next report number, taken with one conditional UPDATE on the number read
    (None when another transaction took it first), stamped on the final jobs no report counted."""
    seq = batch.report_seq + 1
    values: dict[str, Any] = {"report_seq": seq}
    where = [Batch.id == batch.id, Batch.report_seq == batch.report_seq]
    if not completing:  # the completion's own report is the last; progress stops with it
        values["reported_at"] = now
        where.append(Batch.completed_at.is_(None))
    if not session.execute(update(Batch).where(*where).values(**values).execution_options(**_NO_SYNC)).rowcount:
        return None
    newly_done = session.execute(
        update(Job)
        .where(Job.batch_id == batch.id, Job.report_seq.is_(None), Job.status.in_(list(TERMINAL_STATUSES)))
        .values(report_seq=seq)
        .execution_options(**_NO_SYNC)
    ).rowcount
    return Report(seq=seq, newly_done=newly_done)


def progress_payload(batch: Batch, counts: dict[str, int], report: Report) -> dict[str, Any]:
    """``batch.progress`` data: counts by status, done of total, and the manifest cursor — the
    manifest path with ``since`` set to the previous report, which lists the jobs this report
    counted final (and those of any later one)."""
    since = report.seq - 1
    return {"batch_id": batch.id, "seq": report.seq, "counts": counts, "done": done_count(counts),
            "total": batch.job_count, "newly_done": report.newly_done, "since": since,
            "manifest_path": f"{MANIFEST_PATH.format(batch_id=batch.id)}?since={since}",
            "metadata": batch.meta}


def done_count(counts: dict[str, int]) -> int:
    """Jobs in a final status (succeeded, failed, canceled, expired), from ``queries.batch_counts``."""
    return sum(n for status, n in counts.items() if JobStatus(status).is_terminal)


def manifest_jobs(session: Session, batch_id: str, *, start_position: int = 0, since: int | None = None,
                  limit: int | None = None) -> list[Job]:
    """The batch's jobs from ``start_position`` on, in position order; with ``since``, only
    those a report after report ``since`` counted final. Read the batch's ``report_seq`` before
    calling: every job that report counted is then in the answer (a later one's may be too)."""
    query = select(Job).where(Job.batch_id == batch_id, Job.position >= start_position)
    if since is not None:
        query = query.where(Job.report_seq > since)
    query = query.order_by(Job.position)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query.execution_options(populate_existing=True)).all())
