"""``/v1/jobs``: submit one job (with its priority and deadline, within the tenant's limits), list
the tenant's jobs, read one, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from api import idempotency, submission
from api.contract import (
    AFTER,
    BATCH_FILTER,
    BEFORE,
    CREATE,
    CURSOR,
    READ,
    READ_ONE,
    CancelAfter,
    IdempotencyKey,
    Time,
    errors,
    id_path,
)
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.schemas import JobIn, JobList, JobOut, Task
from api.views import job_out
from worker import dedupe, jobs, limits, queries
from worker.errors import NotFound
from worker.models import JobStatus, utcnow

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ROUTE = "POST /v1/jobs"
MAX_LIST_LIMIT = 200


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"job_id: job {job_id!r} not found", field="job_id")


JOB_ID = id_path("job", "6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f")


@router.post("", status_code=202, response_model=JobOut, responses=errors(*CREATE), summary="Submit a job")
def create_job(body: JobIn, tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep,
               idempotency_key: IdempotencyKey = None,
               cancel_after: CancelAfter = None) -> JSONResponse:
    """Queue one job; 202 with the job (status `queued`). Input images are uploaded first
    (`POST /v1/files`). Its events go to `webhook_url`; poll `GET /v1/jobs/{job_id}` otherwise.
    A job with a `seed` identical to one the tenant already ran is answered from that result
    (`dedupe: hit`, status `succeeded` at once, no GPU time), or waits for the identical job
    still running."""
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint(submission.fingerprint_payload(body, cancel_after))
    if (previous := idempotency.replay(session, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    now = utcnow()
    deadline_at = submission.deadline_at(body.deadline_s, cancel_after, now)
    spec = submission.job_spec(session, settings, tenant.id, body)
    webhook_url = submission.check_webhook(settings, body.webhook_url)
    limits.check_submission(session, tenant, new_jobs=1, now=now)
    _, rows = jobs.submit(session, tenant.id, [spec], batch=False, webhook_url=webhook_url,
                          metadata=spec.metadata, max_attempts=settings.max_attempts, priority=body.priority,
                          deadline_at=deadline_at, reuse=dedupe.Reuse.of(settings), commit=False)
    out = job_out(rows[0], store, settings).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, ROUTE, digest, 202, out)) is not None:
        return winner
    return JSONResponse(out, status_code=202)


@router.get("", response_model=JobList, responses=errors(*READ), summary="List jobs")
def list_jobs(tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep,
              status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
              task: Annotated[Task | None, Query(description="only jobs of this task")] = None,
              batch_id: Annotated[str | None, BATCH_FILTER] = None,
              created_after: Annotated[Time | None, AFTER] = None,
              created_before: Annotated[Time | None, BEFORE] = None,
              limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT, description="jobs per page")] = 50,
              cursor: Annotated[str | None, CURSOR] = None) -> JobList:
    """The tenant's jobs, newest first; `created_after`/`created_before` are exclusive."""
    page = queries.list_jobs(session, tenant.id, limit=limit, cursor=cursor, status=status, task=task,
                             batch_id=batch_id, created_after=created_after, created_before=created_before)
    return JobList(data=[job_out(j, store, settings) for j in page.rows], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=errors(*READ_ONE), summary="Get a job")
def get_job(job_id: Annotated[str, JOB_ID], tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep) -> JobOut:
    """The job with its result and, while queued or running, its queue position and ETA."""
    job = queries.get_job(session, tenant.id, job_id)
    if job is None:
        raise _not_found(job_id)
    return job_out(job, store, settings, session)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(*READ_ONE), summary="Cancel a job")
def cancel_job(job_id: Annotated[str, JOB_ID], tenant: TenantDep, session: SessionDep, settings: SettingsDep,
               store: StoreDep) -> JobOut:
    """Queued jobs are canceled at once; running ones stop at the next denoising step. A job
    already final is returned as it is."""
    job = jobs.cancel_job(session, tenant.id, job_id)
    if job is None:
        raise _not_found(job_id)
    return job_out(job, store, settings)
