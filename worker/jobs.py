"""The job system's state machine: the code that changes jobs, batches and files.

Owns: submission (jobs waiting, no chunk), expiring waiting jobs past their deadline, the lease
protocol after a claim (renew, progress, complete, fail, retry with ``not_before``, cancel,
expire, release), GPU-seconds accounting (per job, the job kinds' moving averages) and the
reconciler's writes. The outbox rows announcing a change are written in the same transaction
through ``outbox.py`` (a batch's completion and progress reports through ``progress.py``).
Leaves a chunk's life (formed, published, claimed, dissolved, finished) to ``chunks.py``, the
choice of chunks to ``scheduler.py``, publishing to ``dispatch.py``, execution to the tasks and
HTTP to ``api/``.

Every state change is one conditional UPDATE (``WHERE status = … AND lease_owner = …``), so a
repeat, a late worker or a concurrent reconciler changes nothing and learns so from the row
count. Functions commit their own transaction unless they take ``commit=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker import dedupe, progress, queries
from worker.models import (
    Batch,
    File,
    Job,
    JobCost,
    JobStatus,
    Priority,
    utcnow,
)
from worker.transitions import end_job, promote_twins, settle_waiters

log = logging.getLogger(__name__)

LEASE_EXPIRED = "lease_expired"
DEADLINE_EXPIRED = "deadline_expired"
DEPENDENCY_OUTAGE = "dependency_outage"
COST_EMA_ALPHA = 0.2  # weight of a new measurement in a job kind's moving average
DEFAULT_JOB_GPU_SECONDS = 10.0  # the price of a job of a kind never measured yet

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
    adapter_id: str | None = None  # its scale is params["adapter_scale"]
    rerun_of: str | None = None  # the job this one re-runs (``POST /v1/jobs/{id}/rerun``)
    seed_given: bool = False  # the caller chose the seed: the output is fixed by the request
    session_id: str | None = None  # a session's turn (``worker.sessions``): its session, place and
    turn_index: int | None = None  # the earlier turn it waits for
    after_job_id: str | None = None
    request_hash: str | None = None  # set when an identical job may answer it (``worker.dedupe``)

    @property
    def chunk_key(self) -> str:
        """Jobs with equal keys can share a forward pass: same task, output size, steps, think,
        the same input pictures (a try-on's product) and the same adapter at the same scale (a
        chunk never mixes adapters) — a hash, compared by the dispatcher."""
        key = [self.task, list(self.input_file_ids), self.width, self.height, self.params.get("num_timesteps"),
               self.think]
        if self.adapter_id is not None:
            key += [self.adapter_id, self.params.get("adapter_scale")]
        if self.session_id is not None:  # a turn runs alone: its context is its own
            key += [self.session_id, self.turn_index]
        raw = json.dumps(key, separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    @property
    def cost_key(self) -> str:
        """What a job's GPU time depends on: task, output size, steps, think (the ETA's unit)."""
        return cost_key(self.task, self.width, self.height, self.params.get("num_timesteps"), self.think)


def cost_key(task: str, width: int | None, height: int | None, steps: Any, think: bool) -> str:
    size = f"{width}x{height}" if width and height else "input"
    return f"{task}/{size}/{steps if task != 'understand' else 0}/{'think' if think else 'plain'}"


# ---------------------------------------------------------------------------------------------
# Submission


def submit(session: Session, tenant_id: str, specs: Sequence[JobSpec], *, batch: bool,
           webhook_url: str | None, metadata: dict[str, Any] | None, max_attempts: int = 3,
           priority: Priority = Priority.batch, deadline_at: datetime | None = None,
           progress_interval_s: float | None = None, reuse: dedupe.Reuse | None = None,
           commit: bool = True) -> tuple[Batch | None, list[Job]]:
    """Insert a batch (when ``batch``) and its jobs, waiting (``queued``, no chunk), in one
    transaction; the dispatcher (``worker.scheduler``) forms chunks and publishes them. A single
    job (``batch=False``) takes ``metadata`` as its own. A batch with ``progress_interval_s``
    reports its progress at most that often (``worker.progress``). A spec with a
    ``request_hash`` is placed by ``dedupe.place``: it may wait on an identical job, or be
    answered at once from a finished one (``reuse``: what such a job must show; None: only
    identical jobs still waiting or running count).

    The jobs go in as plain values in one executemany INSERT, not through the unit of work,
    which costs about 0.2 ms of CPU per object (a 256-job batch: 75 ms against 17 ms). The
    returned ``Job`` objects hold the same values but are not in the session: read them."""
    assert specs, "submit needs at least one job spec"
    assert batch or len(specs) == 1, "a non-batch submission holds exactly one job"
    now = utcnow()
    batch_row: Batch | None = None
    if batch:
        batch_row = Batch(id=_uuid(), tenant_id=tenant_id, job_count=len(specs), webhook_url=webhook_url,
                          meta=metadata or {}, created_at=now, priority=priority, deadline_at=deadline_at,
                          progress_interval_s=progress_interval_s)
        session.add(batch_row)
        session.flush()  # before the jobs that refer to it
    values = [dict(
        id=_uuid(), tenant_id=tenant_id, batch_id=batch_row.id if batch_row else None, chunk_id=None,
        position=position, task=spec.task, prompt=spec.prompt, input_file_ids=list(spec.input_file_ids),
        adapter_id=spec.adapter_id, rerun_of=spec.rerun_of, request_hash=spec.request_hash,
        session_id=spec.session_id, turn_index=spec.turn_index, after_job_id=spec.after_job_id,
        params=dict(spec.params), think=spec.think, width=spec.width, height=spec.height,
        status=JobStatus.queued, attempts=0, max_attempts=max_attempts, cancel_requested=False,
        progress_step=0, priority=priority, chunk_key=spec.chunk_key, cost_key=spec.cost_key,
        deadline_at=deadline_at, phase_seconds={}, deferrals=0,
        # N timesteps are N-1 Euler steps: the total the engine reports while denoising.
        progress_total=max(int(spec.params.get("num_timesteps", 0)) - 1, 0) if spec.task != "understand" else 0,
        queued_at=now, meta=spec.metadata if batch else (spec.metadata or metadata or {}),
        webhook_url=webhook_url, created_at=now, updated_at=now,
    ) for position, spec in enumerate(specs)]
    answered = set(dedupe.place(session, tenant_id, values, now, reuse))
    rows = [session.get(Job, row["id"]) if row["id"] in answered else Job(**row) for row in values]
    if commit:
        session.commit()
    log.info("submitted %d job(s) for tenant %s%s", len(values), tenant_id,
             f" as batch {batch_row.id}" if batch_row else "")
    return batch_row, rows


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


def record_cost(session: Session, cost_key: str, seconds_per_job: float) -> None:
    """Fold one measurement into the job kind's moving average of GPU-seconds per job."""
    now = utcnow()
    row = session.get(JobCost, cost_key, with_for_update=True)
    if row is None:
        session.add(JobCost(cost_key=cost_key, avg_gpu_seconds=seconds_per_job, samples=1, updated_at=now))
    else:  # the plain mean of the first samples (a cold start weighs 1/n), then the moving average
        alpha = max(COST_EMA_ALPHA, 1.0 / (row.samples + 1))
        row.avg_gpu_seconds = (1 - alpha) * row.avg_gpu_seconds + alpha * seconds_per_job
        row.samples += 1
        row.updated_at = now
    try:
        session.commit()
    except IntegrityError:  # two workers measured the first sample at once: one is enough
        session.rollback()


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
                 model_seconds: float, gpu_seconds: float | None = None,
                 phase_seconds: dict[str, float] | None = None, provenance: dict[str, Any] | None = None,
                 quality: dict[str, Any] | None = None) -> bool:
    """``running`` → ``succeeded`` if ``worker_id`` still holds the lease; in the same transaction
    the ``job.succeeded`` outbox row and, when this finishes the batch, ``batch.completed``.
    ``gpu_seconds`` (its share of the chunk, added to what earlier attempts used) and
    ``phase_seconds`` are the job's accounting; ``provenance`` its reproducibility record;
    ``quality`` the quality gate's record. Identical jobs waiting on it succeed with it
    (``transitions.answer_twins``)."""
    now = utcnow()
    done = end_job(session, job_id, worker_id, JobStatus.succeeded, now, output_key=output_key,
                       output_text=output_text, think_text=think_text, model_seconds=model_seconds,
                       gpu_seconds=func.coalesce(Job.gpu_seconds, 0.0) + (gpu_seconds or 0.0),
                       phase_seconds=phase_seconds or {}, provenance=provenance, quality=quality,
                       error_code=None, error_message=None, progress_step=Job.progress_total)
    if done:
        log.info("job %s succeeded in %.2f s of model time", job_id, model_seconds)
    return done


def fail_job(session: Session, job_id: str, worker_id: str, code: str, message: str, *,
             provenance: dict[str, Any] | None = None) -> bool:
    """``running`` → ``failed`` if ``worker_id`` still holds the lease, with ``job.failed``;
    ``provenance``: the record of an engine run that failed the job."""
    done = end_job(session, job_id, worker_id, JobStatus.failed, utcnow(),
                       error_code=code, error_message=message, provenance=provenance)
    if done:
        log.error("job %s failed: %s: %s", job_id, code, message)
    return done


def retry_or_fail(session: Session, job_id: str, worker_id: str, code: str, message: str,
                  delay_s: float = 0.0) -> str:
    """After a transient error: back to waiting (lease and chunk cleared, dispatched again no
    earlier than ``delay_s`` from now) while attempts remain, else ``failed``; a job whose
    cancellation was requested becomes ``canceled``. Returns the job's status afterwards
    (unchanged when the worker no longer holds the lease)."""
    if mark_canceled(session, job_id, worker_id):
        return JobStatus.canceled.value
    now = utcnow()
    requeued = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running, Job.lease_owner == worker_id,
               Job.attempts < Job.max_attempts)
        .values(status=JobStatus.queued, lease_owner=None, lease_until=None, chunk_id=None,
                not_before=now + timedelta(seconds=delay_s) if delay_s > 0 else None, error_code=code,
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


def defer_job(session: Session, job_id: str, worker_id: str, code: str, message: str, *, delay_s: float,
              budget_s: float) -> str:
    """A dependency (storage, database, broker) was unavailable while the job ran — not the
    job's fault: back to waiting without spending the attempt its claim counted, dispatched
    again no earlier than ``delay_s`` from now. Its first such wait starts its outage budget:
    once ``budget_s`` has passed since, it fails with ``dependency_outage`` instead. A job
    whose cancellation was requested becomes ``canceled``. Returns the status afterwards
    (unchanged when the worker no longer holds the lease)."""
    if mark_canceled(session, job_id, worker_id):
        return JobStatus.canceled.value
    now = utcnow()
    owned = (Job.id == job_id, Job.status == JobStatus.running, Job.lease_owner == worker_id)
    budget_start = func.coalesce(Job.outage_since, now)
    deferred = session.execute(
        update(Job)
        .where(*owned, budget_start > now - timedelta(seconds=budget_s))
        .values(status=JobStatus.queued, lease_owner=None, lease_until=None, chunk_id=None,
                attempts=Job.attempts - 1,  # the claim counted one; a running job has at least 1
                not_before=now + timedelta(seconds=delay_s), outage_since=budget_start,
                deferrals=Job.deferrals + 1, error_code=code, error_message=message, updated_at=now)
        .execution_options(**_NO_SYNC)
    ).rowcount
    session.commit()
    if deferred:
        log.warning("job %s: %s (%s), waiting %.1f s for it without using an attempt", job_id, code, message,
                    delay_s)
        return JobStatus.queued.value
    if fail_job(session, job_id, worker_id, DEPENDENCY_OUTAGE,
                f"{message}; a dependency was unavailable for more than the outage budget ({budget_s:.0f} s)"):
        return JobStatus.failed.value
    return _status_of(session, job_id)


def mark_canceled(session: Session, job_id: str, worker_id: str) -> bool:
    """``running`` with cancel requested → ``canceled``, if ``worker_id`` holds the lease."""
    return end_job(session, job_id, worker_id, JobStatus.canceled, utcnow(),
                       extra_where=(Job.cancel_requested.is_(True),))


def mark_expired(session: Session, job_id: str, worker_id: str) -> bool:
    """``running`` past its deadline → ``expired`` (stopped at a step), if ``worker_id`` holds
    the lease; the ``job.expired`` outbox row in the same transaction."""
    now = utcnow()
    return end_job(session, job_id, worker_id, JobStatus.expired, now,
                       extra_where=(Job.deadline_at.is_not(None), Job.deadline_at <= now),
                       error_code=DEADLINE_EXPIRED, error_message="the deadline passed while it ran")


def expire_waiting(session: Session, now: datetime) -> int:
    """Waiting jobs (no chunk yet) whose deadline passed → ``expired`` without using a GPU, each
    with its ``job.expired`` outbox row. Returns how many."""
    ids = session.scalars(select(Job.id).where(Job.status == JobStatus.queued, Job.chunk_id.is_(None),
                                               Job.deadline_at.is_not(None), Job.deadline_at <= now)).all()
    expired = 0
    for job_id in ids:
        expired += end_job(session, job_id, None, JobStatus.expired, now, from_status=JobStatus.queued,
                               extra_where=(Job.chunk_id.is_(None),), commit=False,
                               error_code=DEADLINE_EXPIRED, error_message="the deadline passed before it started")
    session.commit()
    if expired:
        log.info("%d waiting job(s) expired at their deadline", expired)
    return expired


def release_jobs(session: Session, job_ids: Iterable[str], worker_id: str) -> int:
    """Graceful shutdown: the worker's running jobs go back to waiting (this attempt is not
    counted, lease and chunk cleared) for the dispatcher to hand to another worker; jobs whose
    cancellation was requested become ``canceled`` instead.
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
                lease_until=None, progress_step=0, chunk_id=None, updated_at=now)
        .returning(Job.id)
        .execution_options(**_NO_SYNC)
    ).scalars().all()
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
    job = queries.get_job(session, tenant_id, job_id)
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
        settle_waiters(session, job, JobStatus.canceled, now)
        if job.batch_id:
            progress.report_batch(session, job.batch_id, now)
    else:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running)
            .values(cancel_requested=True, updated_at=now)
            .execution_options(**_NO_SYNC)
        )
    session.commit()
    return queries.load_jobs(session, [job_id])[0]


def cancel_batch(session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    """Cancel every unfinished job of a batch (queued at once, running cooperatively)."""
    batch = queries.get_batch(session, tenant_id, batch_id)
    if batch is None:
        return None
    now = utcnow()
    canceled = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.queued)
        .values(status=JobStatus.canceled, cancel_requested=True, finished_at=now, updated_at=now)
        .returning(Job.id, Job.request_hash, Job.dedupe_of)
        .execution_options(**_NO_SYNC)
    ).all()
    for job_id, request_hash, dedupe_of in canceled:  # their twins outside the batch run instead
        if request_hash is not None and dedupe_of is None:
            promote_twins(session, job_id, now)
    session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.running)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(**_NO_SYNC)
    )
    session.execute(update(Batch).where(Batch.id == batch_id).values(cancel_requested=True)
                    .execution_options(**_NO_SYNC))
    progress.report_batch(session, batch_id, now)
    session.commit()
    log.info("batch %s: cancel requested", batch_id)
    return queries.get_batch(session, tenant_id, batch_id)


# ---------------------------------------------------------------------------------------------
# Reconciler side


def requeue_expired(session: Session, now: datetime) -> int:
    """Running jobs whose lease ended before ``now``: back to waiting (chunk cleared, for the
    dispatcher), or ``failed`` with ``lease_expired`` when no attempt is left, or ``canceled``
    when cancellation was requested. Returns the number of jobs changed."""
    expired = session.execute(
        select(Job.id, Job.lease_owner, Job.attempts, Job.max_attempts, Job.cancel_requested)
        .where(Job.status == JobStatus.running, Job.lease_until < now)
    ).all()
    changed = 0
    still_expired = (Job.status == JobStatus.running, Job.lease_until < now)
    for job_id, owner, attempts, max_attempts, cancel in expired:
        message = (f"lease of worker {owner!r} expired during attempt {attempts} of {max_attempts}")
        if cancel:
            changed += end_job(session, job_id, None, JobStatus.canceled, now,
                                   extra_where=still_expired, commit=False)
        elif attempts < max_attempts:
            rows = session.execute(
                update(Job).where(Job.id == job_id, *still_expired)
                .values(status=JobStatus.queued, lease_owner=None, lease_until=None, progress_step=0,
                        chunk_id=None, error_code=LEASE_EXPIRED, error_message=message, updated_at=now)
                .execution_options(**_NO_SYNC)
            ).rowcount
            if rows:
                changed += 1
                log.warning("job %s: %s, queued again", job_id, message)
        else:
            changed += end_job(session, job_id, None, JobStatus.failed, now, extra_where=still_expired,
                                   commit=False, error_code=LEASE_EXPIRED, error_message=message)
    session.commit()
    return changed


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


def result_still_held(session: Session, maker_id: str, job_id: str) -> bool:
    """Whether a job other than ``job_id`` still holds the result ``maker_id`` made: the maker
    itself or a job answered from it (``dedupe_of``), succeeded and not expired."""
    held = session.scalar(select(func.count()).select_from(Job).where(
        or_(Job.id == maker_id, Job.dedupe_of == maker_id), Job.id != job_id,
        Job.status == JobStatus.succeeded, Job.result_expired_at.is_(None)))
    session.commit()
    return bool(held)


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
# Internals


def _uuid() -> str:
    return str(uuid.uuid4())


def _status_of(session: Session, job_id: str) -> str:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    session.commit()
    return JobStatus(status).value if status is not None else "missing"
