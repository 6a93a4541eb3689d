"""A job's end: the one UPDATE that makes it final, what it announces, and its twins' share.

Owns: ``end_job`` — ``running`` (or ``queued``) → a terminal status, conditional on the lease
owner, with in the same transaction the job's outbox row, its batch's progress report, and,
for a job that ran for a request hash (``worker.dedupe``), what that means for the twins that
wait on it: when it succeeded they succeed at once with its result (the same stored object, no
GPU time, ``dedupe_of`` naming it); when it ended any other way (failed, canceled, expired) the
oldest twin runs itself instead and the others wait on that one (``promote_twins``) — a twin
never fails for what happened to another job; for a session's turn, the next turn may run, or
fails when it ended without a result (``next_turn``). Leaves the choice of twins to
``dedupe.py``, turns to ``sessions.py`` and every other state change to ``jobs.py``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker import outbox, progress
from worker.models import Job, JobStatus

log = logging.getLogger(__name__)

_NO_SYNC = {"synchronize_session": False}
PREVIOUS_TURN_FAILED = "previous_turn_failed"


def end_job(session: Session, job_id: str, worker_id: str | None, status: JobStatus, now: datetime,
            *, extra_where: tuple[Any, ...] = (), commit: bool = True,
            from_status: JobStatus = JobStatus.running, **values: Any) -> bool:
    """``from_status`` (running) → a terminal ``status`` (conditional on the lease owner when
    ``worker_id`` is given), then the outbox row, the batch's report and the twins' share in the
    same transaction. False (and nothing written) when the row was not in that state."""
    where = [Job.id == job_id, Job.status == from_status, *extra_where]
    if worker_id is not None:
        where.append(Job.lease_owner == worker_id)
    rows = session.execute(
        update(Job).where(*where)
        .values(status=status, finished_at=now, updated_at=now, lease_until=None, **values)
        .execution_options(**_NO_SYNC)
    ).rowcount
    if not rows:
        if commit:
            session.rollback()
        return False
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    if job.batch_id:
        outbox.lock_batch(session, job.batch_id)  # before the outbox insert's foreign-key share lock
    event = {JobStatus.succeeded: outbox.EVENT_JOB_SUCCEEDED, JobStatus.failed: outbox.EVENT_JOB_FAILED,
             JobStatus.expired: outbox.EVENT_JOB_EXPIRED}.get(status)
    if event and job.webhook_url:
        outbox.add_delivery(session, job.tenant_id, event, job.webhook_url, outbox.job_payload(job), now,
                            job_id=job.id, batch_id=job.batch_id)
    if job.batch_id:
        progress.report_batch(session, job.batch_id, now)
    settle_waiters(session, job, status, now)
    if commit:
        session.commit()
    return True


def settle_waiters(session: Session, job: Job, status: JobStatus, now: datetime) -> None:
    """What ``job``'s end (``status``) means for the jobs waiting on it: its identical twins
    (``answer_twins`` / ``promote_twins``) and a session's next turn (``next_turn``). No commit."""
    if job.request_hash is not None and job.dedupe_of is None:
        if status == JobStatus.succeeded:
            answer_twins(session, job, now)
        else:
            promote_twins(session, job.id, now)
    if job.session_id is not None:
        next_turn(session, job, status, now)


def next_turn(session: Session, turn: Job, status: JobStatus, now: datetime) -> None:
    """A session's turn ended: the turn waiting on it may run once it succeeded; otherwise that
    turn, which needs its output, fails (``previous_turn_failed``), and so on down the line."""
    if status == JobStatus.succeeded:
        session.execute(update(Job).where(Job.after_job_id == turn.id, Job.status == JobStatus.queued)
                        .values(after_job_id=None, updated_at=now).execution_options(**_NO_SYNC))
        return
    for job_id in session.scalars(select(Job.id).where(Job.after_job_id == turn.id,
                                                       Job.status == JobStatus.queued)).all():
        end_job(session, job_id, None, JobStatus.failed, now, from_status=JobStatus.queued,
                extra_where=(Job.after_job_id == turn.id,), commit=False, error_code=PREVIOUS_TURN_FAILED,
                error_message=f"turn {turn.turn_index} of its session ended {status.value}; this turn needed it")


def answer_twins(session: Session, original: Job, now: datetime) -> int:
    """The waiting twins of ``original`` (succeeded) succeed with its result: the same stored
    object and texts, its record, no model or GPU time. Returns how many. No commit."""
    ids = session.scalars(select(Job.id).where(Job.dedupe_of == original.id, Job.status == JobStatus.queued)
                          .order_by(Job.queued_at, Job.position)).all()
    answered = sum(answer_twin(session, job_id, original, now) for job_id in ids)
    if answered:
        log.info("job %s: its result answers %d identical job(s)", original.id, answered)
    return answered


def answer_twin(session: Session, job_id: str, original: Job, now: datetime) -> bool:
    """One waiting job succeeds with ``original``'s result (see ``answer_twins``). No commit."""
    record = dict(original.provenance or {}, answered_from=original.id)
    return end_job(session, job_id, None, JobStatus.succeeded, now, from_status=JobStatus.queued,
                   extra_where=(Job.dedupe_of == original.id,), commit=False,
                   output_key=original.output_key, output_text=original.output_text,
                   think_text=original.think_text, model_seconds=0.0, gpu_seconds=0.0, phase_seconds={},
                   provenance=record, quality=original.quality, started_at=now, progress_step=Job.progress_total,
                   error_code=None, error_message=None)


def promote_twins(session: Session, job_id: str, now: datetime) -> str | None:
    """``job_id`` ended without a result: its oldest waiting twin runs itself, the others wait
    on that one. Returns the new runner's id (None: no twin was waiting). No commit."""
    ids = session.scalars(select(Job.id).where(Job.dedupe_of == job_id, Job.status == JobStatus.queued)
                          .order_by(Job.queued_at, Job.position)).all()
    if not ids:
        return None
    runner, rest = ids[0], ids[1:]
    session.execute(update(Job).where(Job.id == runner).values(dedupe_of=None, updated_at=now)
                    .execution_options(**_NO_SYNC))
    if rest:
        session.execute(update(Job).where(Job.id.in_(rest)).values(dedupe_of=runner, updated_at=now)
                        .execution_options(**_NO_SYNC))
    log.info("job %s ended without a result: job %s runs for its %d identical job(s)", job_id, runner, len(ids))
    return runner
