"""The job system's state machine: the only code that changes jobs, batches, chunks, files and
webhook deliveries.

Owns: submission (jobs grouped into chunks), the lease protocol (claim, renew, progress,
complete, fail, retry, cancel, release), the webhook outbox rows written in the same transaction
as the state change they announce, batch completion (exactly once), the reconciler's queries,
and tenant-scoped reads. Leaves publishing to ``worker.dispatch``, execution to the tasks and
HTTP to ``api/``.

Every state change is one conditional UPDATE (``WHERE status = … AND lease_owner = …``), so a
repeat, a late worker or a concurrent reconciler changes nothing and learns so from the row
count. Functions commit their own transaction unless they take ``commit=False``.

Batch completion takes the batch row lock (``SELECT … FOR NO KEY UPDATE``) *after* the job
update and before any outbox insert, then counts active jobs, so two workers finishing a batch's last two jobs concurrently cannot
both miss the completion (PostgreSQL, READ COMMITTED); SQLite serializes writers anyway.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from worker.models import (
    ACTIVE_STATUSES,
    Batch,
    Chunk,
    DeliveryStatus,
    File,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)

log = logging.getLogger(__name__)

EVENT_JOB_SUCCEEDED = "job.succeeded"
EVENT_JOB_FAILED = "job.failed"
EVENT_BATCH_COMPLETED = "batch.completed"
LEASE_EXPIRED = "lease_expired"

_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class JobSpec:
    """One job to submit: parameters already validated and resolved (``worker.params``)."""

    task: str
    prompt: str
    params: dict[str, Any]
    input_file_ids: tuple[str, ...] = ()
    think: bool = False
    width: int | None = None
    height: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share a forward pass (same task, inputs, size, think)."""
        return (self.task, tuple(self.input_file_ids), self.width, self.height, self.think)


# ---------------------------------------------------------------------------------------------
# Submission


def submit(session: Session, tenant_id: str, specs: Sequence[JobSpec], *, batch: bool,
           webhook_url: str | None, metadata: dict[str, Any] | None, chunk_size: int,
           max_attempts: int = 3, commit: bool = True) -> tuple[Batch | None, list[Job], list[Chunk]]:
    """Insert a batch (when ``batch``), its jobs (``queued``) and their chunks in one transaction.

    Jobs are grouped by ``JobSpec.chunk_key`` in order of first appearance, then cut into chunks
    of at most ``chunk_size``. A single job (``batch=False``) takes ``metadata`` as its own."""
    assert specs, "submit needs at least one job spec"
    assert batch or len(specs) == 1, "a non-batch submission holds exactly one job"
    now = utcnow()
    batch_row: Batch | None = None
    if batch:
        batch_row = Batch(id=_uuid(), tenant_id=tenant_id, job_count=len(specs),
                          webhook_url=webhook_url, meta=metadata or {}, created_at=now)
        session.add(batch_row)

    groups: dict[tuple[Any, ...], list[int]] = {}
    for position, spec in enumerate(specs):
        groups.setdefault(spec.chunk_key, []).append(position)

    chunk_of: dict[int, Chunk] = {}
    chunks: list[Chunk] = []
    for positions in groups.values():
        for start in range(0, len(positions), chunk_size):
            chunk = Chunk(id=_uuid(), tenant_id=tenant_id, batch_id=batch_row.id if batch_row else None,
                          created_at=now, publish_count=0)
            chunks.append(chunk)
            for position in positions[start:start + chunk_size]:
                chunk_of[position] = chunk
    session.add_all(chunks)

    jobs: list[Job] = []
    for position, spec in enumerate(specs):
        job_meta = spec.metadata if batch else (spec.metadata or metadata or {})
        jobs.append(Job(
            id=_uuid(), tenant_id=tenant_id, batch_id=batch_row.id if batch_row else None,
            chunk_id=chunk_of[position].id, position=position, task=spec.task, prompt=spec.prompt,
            input_file_ids=list(spec.input_file_ids), params=dict(spec.params), think=spec.think,
            width=spec.width, height=spec.height, status=JobStatus.queued, attempts=0,
            max_attempts=max_attempts, cancel_requested=False, progress_step=0,
            # N timesteps are N-1 Euler steps: the total the engine reports while denoising.
            progress_total=max(int(spec.params.get("num_timesteps", 0)) - 1, 0) if spec.task != "understand" else 0,
            queued_at=now, meta=job_meta, webhook_url=webhook_url, created_at=now, updated_at=now,
        ))
    session.add_all(jobs)
    session.flush()
    if commit:
        session.commit()
    log.info("submitted %d job(s) in %d chunk(s) for tenant %s%s", len(jobs), len(chunks), tenant_id,
             f" as batch {batch_row.id}" if batch_row else "")
    return batch_row, jobs, chunks


def add_file(session: Session, tenant_id: str, *, sha256: str, storage_key: str, content_type: str,
             fmt: str, width: int, height: int, size_bytes: int, filename: str | None,
             commit: bool = True) -> File:
    """Record an uploaded file, or return the tenant's existing row for the same content."""
    existing = session.scalar(select(File).where(File.tenant_id == tenant_id, File.sha256 == sha256))
    if existing is not None:
        return existing
    row = File(id=_uuid(), tenant_id=tenant_id, sha256=sha256, storage_key=storage_key,
               content_type=content_type, format=fmt, width=width, height=height,
               size_bytes=size_bytes, filename=filename, created_at=utcnow())
    session.add(row)
    session.flush()
    if commit:
        session.commit()
    return row


# ---------------------------------------------------------------------------------------------
# Worker side: the lease protocol


def claim_chunk(session: Session, chunk_id: str, worker_id: str, lease_s: float) -> list[Job]:
    """Take the chunk's queued, not-cancel-requested jobs: ``running``, attempts + 1, leased to
    ``worker_id`` for ``lease_s``. Returns only the jobs this call claimed (by position)."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(Job.chunk_id == chunk_id, Job.status == JobStatus.queued, Job.cancel_requested.is_(False))
        .values(status=JobStatus.running, attempts=Job.attempts + 1, lease_owner=worker_id,
                lease_until=now + timedelta(seconds=lease_s), started_at=now, updated_at=now,
                progress_step=0)
        .returning(Job.id)
        .execution_options(**_NO_SYNC)
    ).scalars().all()
    session.commit()
    if not claimed:
        return []
    jobs = _load_jobs(session, claimed)
    log.info("worker %s claimed %d job(s) of chunk %s", worker_id, len(jobs), chunk_id)
    return jobs


def renew_lease(session: Session, job_ids: Iterable[str], worker_id: str, lease_s: float) -> None:
    """Push the lease of the worker's running jobs ``lease_s`` into the future."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.running, Job.lease_owner == worker_id)
        .values(lease_until=now + timedelta(seconds=lease_s), updated_at=now)
        .execution_options(**_NO_SYNC)
    )
    session.commit()


def record_progress(session: Session, job_ids: Iterable[str], worker_id: str, step: int, total: int) -> None:
    """Store denoising progress for the worker's running jobs."""
    session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.running, Job.lease_owner == worker_id)
        .values(progress_step=step, progress_total=total, updated_at=utcnow())
        .execution_options(**_NO_SYNC)
    )
    session.commit()


def cancel_requested_ids(session: Session, job_ids: Iterable[str]) -> set[str]:
    """The subset of ``job_ids`` whose cancellation was requested."""
    ids = list(job_ids)
    if not ids:
        return set()
    found = session.scalars(select(Job.id).where(Job.id.in_(ids), Job.cancel_requested.is_(True))).all()
    session.commit()
    return set(found)


def complete_job(session: Session, job_id: str, worker_id: str, *, output_key: str | None = None,
                 output_text: str | None = None, think_text: str | None = None,
                 model_seconds: float) -> bool:
    """``running`` → ``succeeded`` if ``worker_id`` still holds the lease; in the same transaction
    the ``job.succeeded`` outbox row and, when this finishes the batch, ``batch.completed``."""
    now = utcnow()
    done = _transition(session, job_id, worker_id, JobStatus.succeeded, now, output_key=output_key,
                       output_text=output_text, think_text=think_text, model_seconds=model_seconds,
                       error_code=None, error_message=None, progress_step=Job.progress_total)
    if done:
        log.info("job %s succeeded in %.2f s of model time", job_id, model_seconds)
    return done


def fail_job(session: Session, job_id: str, worker_id: str, code: str, message: str) -> bool:
    """``running`` → ``failed`` if ``worker_id`` still holds the lease, with ``job.failed``."""
    done = _transition(session, job_id, worker_id, JobStatus.failed, utcnow(),
                       error_code=code, error_message=message)
    if done:
        log.error("job %s failed: %s: %s", job_id, code, message)
    return done


def retry_or_fail(session: Session, job_id: str, worker_id: str, code: str, message: str) -> str:
    """After a transient error: back to ``queued`` (lease cleared) while attempts remain, else
    ``failed``; a job whose cancellation was requested becomes ``canceled``. Returns the job's
    status afterwards (unchanged when the worker no longer holds the lease)."""
    if mark_canceled(session, job_id, worker_id):
        return JobStatus.canceled.value
    now = utcnow()
    requeued = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.lease_owner == worker_id,
               Job.attempts < Job.max_attempts)
        .values(status=JobStatus.queued, lease_owner=None, lease_until=None, error_code=code,
                error_message=message, updated_at=now)
        .execution_options(**_NO_SYNC)
    ).rowcount
    session.commit()
    if requeued:
        log.warning("job %s: %s (%s), queued again for another attempt", job_id, code, message)
        return JobStatus.queued.value
    if fail_job(session, job_id, worker_id, code, message):
        return JobStatus.failed.value
    return _status_of(session, job_id)


def mark_canceled(session: Session, job_id: str, worker_id: str) -> bool:
    """``running`` with cancel requested → ``canceled``, if ``worker_id`` holds the lease."""
    return _transition(session, job_id, worker_id, JobStatus.canceled, utcnow(),
                       extra_where=(Job.cancel_requested.is_(True),))


def release_jobs(session: Session, job_ids: Iterable[str], worker_id: str) -> int:
    """Graceful shutdown: the worker's running jobs go back to ``queued`` (this attempt is not
    counted, lease cleared) and their chunks are marked unpublished so the reconciler sends
    them again at once; jobs whose cancellation was requested become ``canceled`` instead.
    Returns the number of jobs put back."""
    ids = list(job_ids)
    if not ids:
        return 0
    for job_id in session.scalars(select(Job.id).where(
            Job.id.in_(ids), Job.cancel_requested.is_(True), Job.lease_owner == worker_id)).all():
        mark_canceled(session, job_id, worker_id)
    now = utcnow()
    released = session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.status == JobStatus.running, Job.lease_owner == worker_id)
        .values(status=JobStatus.queued, attempts=Job.attempts - 1, lease_owner=None,
                lease_until=None, progress_step=0, updated_at=now)
        .returning(Job.chunk_id)
        .execution_options(**_NO_SYNC)
    ).scalars().all()
    _unpublish(session, set(released))
    session.commit()
    if released:
        log.warning("worker %s released %d job(s) back to the queue", worker_id, len(released))
    return len(released)


# ---------------------------------------------------------------------------------------------
# API side: cancellation


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    """Cancel one job: ``queued`` → ``canceled`` at once, ``running`` → cancel requested (the
    worker stops between denoising steps). Finished jobs are left as they are. Returns the job
    (``None`` when it is not the tenant's)."""
    job = get_job(session, tenant_id, job_id)
    if job is None:
        return None
    now = utcnow()
    canceled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.canceled, cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(**_NO_SYNC)
    ).rowcount
    if canceled:
        if job.batch_id:
            _complete_batch_if_done(session, job.batch_id, now)
    else:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running)
            .values(cancel_requested=True, updated_at=now)
            .execution_options(**_NO_SYNC)
        )
    session.commit()
    return _load_jobs(session, [job_id])[0]


def cancel_batch(session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    """Cancel every unfinished job of a batch (queued at once, running cooperatively)."""
    batch = get_batch(session, tenant_id, batch_id)
    if batch is None:
        return None
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.canceled, cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(**_NO_SYNC)
    )
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.running)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(**_NO_SYNC)
    )
    session.execute(update(Batch).where(Batch.id == batch_id).values(cancel_requested=True)
                    .execution_options(**_NO_SYNC))
    _complete_batch_if_done(session, batch_id, now)
    session.commit()
    log.info("batch %s: cancel requested", batch_id)
    return get_batch(session, tenant_id, batch_id)


# ---------------------------------------------------------------------------------------------
# Reconciler side


def requeue_expired(session: Session, now: datetime) -> int:
    """Running jobs whose lease ended before ``now``: back to ``queued`` (their chunks marked
    unpublished), or ``failed`` with ``lease_expired`` when no attempt is left, or ``canceled``
    when cancellation was requested. Returns the number of jobs changed."""
    expired = session.execute(
        select(Job.id, Job.chunk_id, Job.lease_owner, Job.attempts, Job.max_attempts, Job.cancel_requested)
        .where(Job.status == JobStatus.running, Job.lease_until < now)
    ).all()
    changed = 0
    requeued_chunks: set[str] = set()
    still_expired = (Job.status == JobStatus.running, Job.lease_until < now)
    for job_id, chunk_id, owner, attempts, max_attempts, cancel in expired:
        message = (f"lease of worker {owner!r} expired during attempt {attempts} of {max_attempts}")
        if cancel:
            changed += _transition(session, job_id, None, JobStatus.canceled, now,
                                   extra_where=still_expired, commit=False)
        elif attempts < max_attempts:
            rows = session.execute(
                update(Job).where(Job.id == job_id, *still_expired)
                .values(status=JobStatus.queued, lease_owner=None, lease_until=None, progress_step=0,
                        error_code=LEASE_EXPIRED, error_message=message, updated_at=now)
                .execution_options(**_NO_SYNC)
            ).rowcount
            if rows:
                requeued_chunks.add(chunk_id)
                changed += 1
                log.warning("job %s: %s, queued again", job_id, message)
        else:
            changed += _transition(session, job_id, None, JobStatus.failed, now, extra_where=still_expired,
                                   commit=False, error_code=LEASE_EXPIRED, error_message=message)
    _unpublish(session, requeued_chunks)
    session.commit()
    return changed


def chunks_to_publish(session: Session, now: datetime, republish_after_s: float) -> list[str]:
    """Chunks holding queued jobs that were never published or last published more than
    ``republish_after_s`` before ``now`` (their message may be lost, e.g. Redis was flushed)."""
    threshold = now - timedelta(seconds=republish_after_s)
    ids = session.scalars(
        select(Chunk.id).distinct()
        .join(Job, Job.chunk_id == Chunk.id)
        .where(Job.status == JobStatus.queued,
               or_(Chunk.published_at.is_(None), Chunk.published_at < threshold))
    ).all()
    session.commit()
    return list(ids)


def mark_published(session: Session, chunk_ids: Iterable[str]) -> None:
    """Record that a message for each chunk was just sent."""
    ids = list(chunk_ids)
    if not ids:
        return
    session.execute(update(Chunk).where(Chunk.id.in_(ids))
                    .values(published_at=utcnow(), publish_count=Chunk.publish_count + 1)
                    .execution_options(**_NO_SYNC))
    session.commit()


def expired_results(session: Session, now: datetime, retention_s: float, limit: int = 500) -> list[Job]:
    """Succeeded jobs that finished more than ``retention_s`` before ``now`` and still hold results."""
    threshold = now - timedelta(seconds=retention_s)
    jobs = session.scalars(
        select(Job).where(Job.status == JobStatus.succeeded, Job.finished_at < threshold,
                          Job.result_expired_at.is_(None))
        .order_by(Job.finished_at).limit(limit)
        .execution_options(populate_existing=True)
    ).all()
    session.commit()
    return list(jobs)


def mark_result_expired(session: Session, job_id: str) -> bool:
    """Forget a job's results (the caller deleted the object): texts cleared, no more URL."""
    rows = session.execute(
        update(Job).where(Job.id == job_id, Job.result_expired_at.is_(None))
        .values(result_expired_at=utcnow(), output_text=None, think_text=None)
        .execution_options(**_NO_SYNC)
    ).rowcount
    session.commit()
    return bool(rows)


# ---------------------------------------------------------------------------------------------
# Webhook side


def due_deliveries(session: Session, now: datetime, limit: int, *, claim_s: float = 60.0) -> list[WebhookDelivery]:
    """Pending deliveries due at ``now``, oldest first. Each returned row is claimed for
    ``claim_s`` (its ``next_attempt_at`` moved forward by a conditional update), so concurrent
    webhook workers do not send the same row twice; ``record_attempt`` sets the real next time."""
    candidates = session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == DeliveryStatus.pending, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)
    ).all()
    claimed: list[str] = []
    for delivery_id in candidates:
        rows = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.pending,
                   WebhookDelivery.next_attempt_at <= now)
            .values(next_attempt_at=now + timedelta(seconds=claim_s))
            .execution_options(**_NO_SYNC)
        ).rowcount
        if rows:
            claimed.append(delivery_id)
    session.commit()
    if not claimed:
        return []
    rows_by_id = {d.id: d for d in session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id.in_(claimed))
        .execution_options(populate_existing=True)).all()}
    session.commit()
    return [rows_by_id[i] for i in claimed]


def record_attempt(session: Session, delivery_id: str, *, status_code: int | None, error: str | None,
                   duration_ms: float, delivered: bool, next_attempt_at: datetime | None) -> None:
    """Store one delivery attempt and the delivery's new state: ``delivered``; ``pending`` until
    ``next_attempt_at``; or ``failed`` when not delivered and no next attempt is planned."""
    delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if delivery is None or delivery.status != DeliveryStatus.pending:
        session.commit()
        return
    now = utcnow()
    if delivered:
        status = DeliveryStatus.delivered
    elif next_attempt_at is None:
        status = DeliveryStatus.failed
    else:
        status = DeliveryStatus.pending
    rows = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.pending,
               WebhookDelivery.attempts == delivery.attempts)
        .values(attempts=WebhookDelivery.attempts + 1, last_status_code=status_code, last_error=error,
                status=status, next_attempt_at=None if status != DeliveryStatus.pending else next_attempt_at,
                delivered_at=now if delivered else None)
        .execution_options(**_NO_SYNC)
    ).rowcount
    if rows:
        session.add(WebhookAttempt(delivery_id=delivery_id, attempt_no=delivery.attempts + 1,
                                   status_code=status_code, error=error, duration_ms=duration_ms,
                                   created_at=now))
    session.commit()


# ---------------------------------------------------------------------------------------------
# Reading (tenant-scoped: another tenant's id reads as None)


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
                          .execution_options(populate_existing=True))


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
                          .execution_options(populate_existing=True))


def get_file(session: Session, tenant_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))


def files_by_sha256(session: Session, tenant_id: str, sha256: str) -> File | None:
    """The tenant's file with this content, if uploaded before."""
    return session.scalar(select(File).where(File.tenant_id == tenant_id, File.sha256 == sha256))


def files_by_ids(session: Session, tenant_id: str, file_ids: Iterable[str]) -> dict[str, File]:
    """The tenant's files among ``file_ids`` (ids of other tenants are simply absent)."""
    ids = list(set(file_ids))
    if not ids:
        return {}
    rows = session.scalars(select(File).where(File.id.in_(ids), File.tenant_id == tenant_id)).all()
    return {f.id: f for f in rows}


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    """Number of the batch's jobs in each status (every status present, zeros included)."""
    counts = {s.value: 0 for s in JobStatus}
    for status, n in session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all():
        counts[JobStatus(status).value] = n
    return counts


def batch_progress(session: Session, batch_id: str) -> float:
    """Fraction of the batch's work done: finished jobs count 1, running ones step/total."""
    rows = session.execute(select(Job.status, Job.progress_step, Job.progress_total)
                           .where(Job.batch_id == batch_id)).all()
    if not rows:
        return 1.0
    done = 0.0
    for status, step, total in rows:
        if JobStatus(status).is_terminal:
            done += 1.0
        elif status == JobStatus.running and total:
            done += min(step / total, 1.0)
    return done / len(rows)


def list_batch_jobs(session: Session, tenant_id: str, batch_id: str, *, page: int = 1,
                    page_size: int = 50) -> list[Job] | None:
    """One page (1-based) of the batch's jobs in submission order; ``None`` when not the tenant's."""
    if get_batch(session, tenant_id, batch_id) is None:
        return None
    return list(session.scalars(
        select(Job).where(Job.batch_id == batch_id).order_by(Job.position)
        .offset((page - 1) * page_size).limit(page_size)
        .execution_options(populate_existing=True)
    ).all())


def load_jobs(session: Session, job_ids: Iterable[str]) -> list[Job]:
    """Fresh rows for ``job_ids`` (any tenant; worker side), in batch position order."""
    return _load_jobs(session, list(job_ids))


def chunk_jobs(session: Session, chunk_id: str) -> list[Job]:
    """Every job of a chunk, fresh, in position order (worker side)."""
    return list(session.scalars(select(Job).where(Job.chunk_id == chunk_id).order_by(Job.position)
                                .execution_options(populate_existing=True)).all())


# ---------------------------------------------------------------------------------------------
# Internals


def _uuid() -> str:
    return str(uuid.uuid4())


def _delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _load_jobs(session: Session, ids: Sequence[str]) -> list[Job]:
    rows = session.scalars(select(Job).where(Job.id.in_(list(ids))).order_by(Job.position)
                           .execution_options(populate_existing=True)).all()
    session.commit()
    return list(rows)


def _status_of(session: Session, job_id: str) -> str:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    session.commit()
    return JobStatus(status).value if status is not None else "missing"


def _unpublish(session: Session, chunk_ids: set[str]) -> None:
    if chunk_ids:
        session.execute(update(Chunk).where(Chunk.id.in_(list(chunk_ids))).values(published_at=None)
                        .execution_options(**_NO_SYNC))


def _transition(session: Session, job_id: str, worker_id: str | None, status: JobStatus, now: datetime,
                *, extra_where: tuple[Any, ...] = (), commit: bool = True, **values: Any) -> bool:
    """running → a terminal ``status`` (conditional on the lease owner when ``worker_id`` is
    given), then the outbox row and the batch completion in the same transaction."""
    where = [Job.id == job_id, Job.status == JobStatus.running, *extra_where]
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
        _lock_batch(session, job.batch_id)  # before the outbox insert's foreign-key share lock
    event = {JobStatus.succeeded: EVENT_JOB_SUCCEEDED, JobStatus.failed: EVENT_JOB_FAILED}.get(status)
    if event and job.webhook_url:
        _add_delivery(session, job.tenant_id, event, job.webhook_url, _job_payload(job), now,
                      job_id=job.id, batch_id=job.batch_id)
    if job.batch_id:
        _complete_batch_if_done(session, job.batch_id, now)
    if commit:
        session.commit()
    return True


def _lock_batch(session: Session, batch_id: str) -> Batch | None:
    # FOR NO KEY UPDATE: serializes completions of one batch without conflicting with the
    # KEY SHARE locks that inserting outbox rows (foreign key to the batch) takes.
    return session.scalar(select(Batch).where(Batch.id == batch_id).with_for_update(key_share=True)
                          .execution_options(populate_existing=True))


def _complete_batch_if_done(session: Session, batch_id: str, now: datetime) -> None:
    batch = _lock_batch(session, batch_id)
    if batch is None or batch.completed_at is not None:
        return
    active = session.scalar(select(func.count()).select_from(Job)
                            .where(Job.batch_id == batch_id, Job.status.in_(list(ACTIVE_STATUSES))))
    if active:
        return
    rows = session.execute(update(Batch).where(Batch.id == batch_id, Batch.completed_at.is_(None))
                           .values(completed_at=now).execution_options(**_NO_SYNC)).rowcount
    if not rows:
        return
    log.info("batch %s completed", batch_id)
    if batch.webhook_url:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.position)
                               .execution_options(populate_existing=True)).all()
        _add_delivery(session, batch.tenant_id, EVENT_BATCH_COMPLETED, batch.webhook_url,
                      _batch_payload(batch, jobs, now), now, batch_id=batch_id)


def _add_delivery(session: Session, tenant_id: str, event: str, url: str, data: dict[str, Any],
                  now: datetime, *, job_id: str | None = None, batch_id: str | None = None) -> None:
    payload = {"type": event, "timestamp": now.isoformat(), "data": data}
    session.add(WebhookDelivery(id=_delivery_id(), tenant_id=tenant_id, event=event, job_id=job_id,
                                batch_id=batch_id, url=url, payload=payload,
                                status=DeliveryStatus.pending, attempts=0, next_attempt_at=now,
                                created_at=now))


def _job_payload(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "batch_id": job.batch_id,
        "position": job.position,
        "task": job.task,
        "status": JobStatus(job.status).value,
        "output_key": job.output_key,
        "output_text": job.output_text,
        "think_text": job.think_text,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "model_seconds": job.model_seconds,
        "metadata": job.meta,
    }


def _batch_payload(batch: Batch, jobs: Sequence[Job], now: datetime) -> dict[str, Any]:
    counts = {s.value: 0 for s in JobStatus}
    manifest = []
    for job in jobs:
        status = JobStatus(job.status).value
        counts[status] += 1
        manifest.append({"job_id": job.id, "position": job.position, "status": status,
                         "output_key": job.output_key, "error_code": job.error_code})
    return {"batch_id": batch.id, "completed_at": now.isoformat(), "counts": counts,
            "metadata": batch.meta, "jobs": manifest}
