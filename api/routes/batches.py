"""``/v1/batches``: submit many jobs at once (try-on form or per-item tasks), read a batch's
counts and progress, page through its jobs, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse

from api import idempotency, submission
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.schemas import BatchIn, BatchOut, JobPage
from api.views import batch_out, job_out
from worker import jobs
from worker.errors import NotFound

router = APIRouter(prefix="/v1/batches", tags=["batches"])
ROUTE = "POST /v1/batches"
MAX_PAGE_SIZE = 200


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"batch_id: batch {batch_id!r} not found", field="batch_id")


@router.post("", status_code=202, response_model=BatchOut)
def create_batch(body: BatchIn, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
                 idempotency_key: Annotated[str | None, Header()] = None) -> JSONResponse:
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint(body.model_dump(mode="json"))
    if (previous := idempotency.replay(session, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    specs = submission.batch_specs(session, settings, tenant.id, body)
    webhook_url = submission.check_webhook(settings, body.webhook_url)
    metadata = submission.check_metadata(body.metadata)
    batch, rows, chunks = jobs.submit(session, tenant.id, specs, batch=True, webhook_url=webhook_url,
                                      metadata=metadata, chunk_size=settings.chunk_size,
                                      max_attempts=settings.max_attempts, commit=False)
    assert batch is not None
    out = batch_out(session, batch, [j.id for j in rows]).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, ROUTE, digest, 202, out)) is not None:
        return winner
    submission.publish(settings, session, [c.id for c in chunks])
    return JSONResponse(out, status_code=202)


@router.get("/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: str, tenant: TenantDep, session: SessionDep) -> BatchOut:
    batch = jobs.get_batch(session, tenant.id, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    return batch_out(session, batch)


@router.get("/{batch_id}/jobs", response_model=JobPage)
def list_batch_jobs(batch_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep,
                    page: Annotated[int, Query(ge=1)] = 1,
                    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50) -> JobPage:
    rows = jobs.list_batch_jobs(session, tenant.id, batch_id, page=page, page_size=page_size)
    if rows is None:
        raise _not_found(batch_id)
    batch = jobs.get_batch(session, tenant.id, batch_id)
    assert batch is not None
    has_more = page * page_size < batch.job_count
    return JobPage(items=[job_out(j, store, settings) for j in rows], page=page, page_size=page_size,
                   total=batch.job_count, next_page=page + 1 if has_more else None)


@router.post("/{batch_id}/cancel", response_model=BatchOut)
def cancel_batch(batch_id: str, tenant: TenantDep, session: SessionDep) -> BatchOut:
    """Queued jobs are canceled at once; running ones stop at the next denoising step."""
    batch = jobs.cancel_batch(session, tenant.id, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    return batch_out(session, batch)
