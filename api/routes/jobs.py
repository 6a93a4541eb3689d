"""``/v1/jobs``: submit one job, read it, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from api import idempotency, submission
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.schemas import JobIn, JobOut
from api.views import job_out
from worker import jobs
from worker.errors import NotFound

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ROUTE = "POST /v1/jobs"


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"job_id: job {job_id!r} not found", field="job_id")


@router.post("", status_code=202, response_model=JobOut)
def create_job(body: JobIn, tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep,
               idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint(body.model_dump(mode="json"))
    if (previous := idempotency.replay(session, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    spec = submission.job_spec(session, settings, tenant.id, body)
    webhook_url = submission.check_webhook(settings, body.webhook_url)
    _, rows, chunks = jobs.submit(session, tenant.id, [spec], batch=False, webhook_url=webhook_url,
                                  metadata=spec.metadata, chunk_size=settings.chunk_size,
                                  max_attempts=settings.max_attempts, commit=False)
    out = job_out(rows[0], store, settings).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, ROUTE, digest, 202, out)) is not None:
        return winner
    submission.publish(settings, session, [c.id for c in chunks])
    return JSONResponse(out, status_code=202)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep) -> JobOut:
    job = jobs.get_job(session, tenant.id, job_id)
    if job is None:
        raise _not_found(job_id)
    return job_out(job, store, settings)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
               store: StoreDep) -> JobOut:
    """Queued jobs are canceled at once; running ones stop at the next denoising step."""
    job = jobs.cancel_job(session, tenant.id, job_id)
    if job is None:
        raise _not_found(job_id)
    return job_out(job, store, settings)
