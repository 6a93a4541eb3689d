"""Rows to response bodies: jobs (with result URLs), batches (with counts and progress) and a
batch manifest's entries.

Owns: what a client sees of a job or batch — status, error, progress, timings and the result
(a presigned S3 URL or a signed API download URL with its expiry, texts inline). Leaves the
rows to ``worker.jobs``, the URLs to ``worker.storage`` and a manifest's pages and CSV to
``api.manifest``.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from api.quality_schemas import QualityOut
from api.schemas import (
    BatchOut,
    ErrorInfo,
    JobOut,
    ManifestEntry,
    Progress,
    QueueOut,
    Result,
    Timings,
)
from worker import eta, queries
from worker.models import Batch, Job, JobStatus, Priority, utcnow
from worker.settings import Settings
from worker.storage import ResultStore, content_type_for


def _result(job: Job, store: ResultStore, settings: Settings) -> Result | None:
    if JobStatus(job.status) != JobStatus.succeeded:
        return None
    if job.result_expired_at is not None:
        return Result(expired=True)
    result = Result(text=job.output_text, think_text=job.think_text)
    if job.output_key:
        result.url = store.url(job.output_key, settings.presign_expiry_s)
        result.url_expires_at = utcnow() + timedelta(seconds=settings.presign_expiry_s)
        result.content_type = content_type_for(job.output_key)
    return result


def _queue(info: eta.QueueInfo | None) -> QueueOut | None:
    return None if info is None else QueueOut(position=info.position, tenant_position=info.tenant_position,
                                               eta_s=info.eta_s, eta_at=info.eta_at, live_workers=info.live_workers)


def job_out(job: Job, store: ResultStore, settings: Settings, session: Session | None = None) -> JobOut:
    """``session`` given: with its queue position and ETA (a few queries; single-job reads)."""
    return JobOut(
        id=job.id, batch_id=job.batch_id, position=job.position, task=job.task,
        status=JobStatus(job.status).value, prompt=job.prompt, input_file_ids=list(job.input_file_ids),
        think=job.think, width=job.width, height=job.height, params=dict(job.params), adapter=job.adapter_id,
        attempts=job.attempts, max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
        error=ErrorInfo(code=job.error_code, message=job.error_message)
        if job.error_code and JobStatus(job.status) == JobStatus.failed else None,
        progress=Progress(step=job.progress_step, total=job.progress_total),
        timings=Timings(queued_at=job.queued_at, started_at=job.started_at, finished_at=job.finished_at,
                        model_seconds=job.model_seconds, gpu_seconds=job.gpu_seconds,
                        phases=dict(job.phase_seconds or {})),
        result=_result(job, store, settings), metadata=dict(job.meta or {}), webhook_url=job.webhook_url,
        created_at=job.created_at, priority=Priority(job.priority), deadline_at=job.deadline_at,
        queue=_queue(eta.job_queue(session, settings, job)) if session is not None else None,
        rerun_of=job.rerun_of, dedupe=job.dedupe_state, dedupe_of=job.dedupe_source,
        quality=_quality(job, store, settings), session_id=job.session_id, turn_index=job.turn_index,
    )


def _quality(job: Job, store: ResultStore, settings: Settings) -> QualityOut | None:
    """The gate's record with a download URL per attempt while the result is kept."""
    if not job.quality:
        return None
    kept = job.result_expired_at is None
    attempts = [{**{k: v for k, v in attempt.items() if k != "output_key"},
                 "url": store.url(attempt["output_key"], settings.presign_expiry_s)
                 if kept and attempt.get("output_key") else None}
                for attempt in job.quality.get("attempts", [])]
    return QualityOut.model_validate({**job.quality, "attempts": attempts})


def batch_out(session: Session, batch: Batch, job_ids: list[str] | None = None,
              settings: Settings | None = None) -> BatchOut:
    """``settings`` given: with its queue position and ETA (single-batch reads)."""
    return BatchOut(
        id=batch.id, status="completed" if batch.completed_at else "active", job_count=batch.job_count,
        counts=queries.batch_counts(session, batch.id), progress=round(queries.batch_progress(session, batch.id), 4),
        cancel_requested=batch.cancel_requested, webhook_url=batch.webhook_url, metadata=dict(batch.meta or {}),
        created_at=batch.created_at, completed_at=batch.completed_at, job_ids=job_ids,
        priority=Priority(batch.priority), deadline_at=batch.deadline_at,
        gpu_seconds=round(queries.batch_gpu_seconds(session, batch.id), 4),
        queue=_queue(eta.batch_queue(session, settings, batch.id)) if settings is not None else None,
    )


def manifest_entry(job: Job, store: ResultStore, settings: Settings) -> ManifestEntry:
    """One job as a manifest line: the result URL minted as for the job view."""
    status = JobStatus(job.status)
    result = _result(job, store, settings)
    has_error = status in (JobStatus.failed, JobStatus.expired)
    return ManifestEntry(
        job_id=job.id, position=job.position, status=status.value, output_key=job.output_key,
        error_code=job.error_code if has_error else None, output_url=result.url if result else None,
        output_url_expires_at=result.url_expires_at if result else None,
        error_message=job.error_message if has_error else None, task=job.task, prompt=job.prompt, think=job.think,
        think_text=job.think_text, output_text=job.output_text, queued_at=job.queued_at, started_at=job.started_at,
        finished_at=job.finished_at, model_seconds=job.model_seconds, gpu_seconds=job.gpu_seconds,
        seq=job.report_seq,
    )
