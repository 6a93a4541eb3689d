"""``/v1/batches``: submit many jobs at once (try-on form or per-item tasks; with a priority and a
deadline, within the tenant's limits), list the tenant's batches, read a batch's counts and
progress, page through its jobs, read its manifest (JSON pages or CSV) at any time, cancel it."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api import idempotency, manifest, submission
from api.contract import (
    AFTER,
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
from api.schemas import BatchIn, BatchList, BatchOut, JobPage, Manifest
from api.views import batch_out, job_out
from worker import dedupe, jobs, limits, queries
from worker.errors import NotFound
from worker.models import utcnow

router = APIRouter(prefix="/v1/batches", tags=["batches"])
ROUTE = "POST /v1/batches"
MAX_PAGE_SIZE = 200
MAX_MANIFEST_PAGE = 1000


BATCH_ID = id_path("batch", "b2")


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"batch_id: batch {batch_id!r} not found", field="batch_id")


@router.post("", status_code=202, response_model=BatchOut, responses=errors(*CREATE), summary="Submit a batch")
def create_batch(body: BatchIn, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
                 idempotency_key: IdempotencyKey = None, cancel_after: CancelAfter = None) -> JSONResponse:
    """Queue many jobs at once; 202 with the batch and its `job_ids` in item order. A try-on
    batch is one product (`product_file`) and one item per scene; every item shares the product's
    context on the GPU. `batch.progress` events while it runs, `batch.completed` with the manifest
    at the end; `GET /v1/batches/{batch_id}/manifest` at any time."""
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint(submission.fingerprint_payload(body, cancel_after))
    if (previous := idempotency.replay(session, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    now = utcnow()
    deadline_at = submission.deadline_at(body.deadline_s, cancel_after, now)
    specs = submission.batch_specs(session, settings, tenant.id, body)
    webhook_url = submission.check_webhook(settings, body.webhook_url)
    metadata = submission.check_metadata(body.metadata)
    limits.check_submission(session, tenant, new_jobs=len(specs), now=now)
    batch, rows = jobs.submit(session, tenant.id, specs, batch=True, webhook_url=webhook_url,
                              metadata=metadata, max_attempts=settings.max_attempts, priority=body.priority,
                              deadline_at=deadline_at, progress_interval_s=settings.batch_progress_interval_s,
                              reuse=dedupe.Reuse.of(settings), commit=False)
    assert batch is not None
    out = batch_out(session, batch, [j.id for j in rows]).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, ROUTE, digest, 202, out)) is not None:
        return winner
    return JSONResponse(out, status_code=202)


@router.get("", response_model=BatchList, responses=errors(*READ), summary="List batches")
def list_batches(tenant: TenantDep, session: SessionDep,
                 status: Annotated[Literal["active", "completed"] | None, Query(
                     description="only active or only completed batches")] = None,
                 created_after: Annotated[Time | None, AFTER] = None,
                 created_before: Annotated[Time | None, BEFORE] = None,
                 limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="batches per page")] = 50,
                 cursor: Annotated[str | None, CURSOR] = None) -> BatchList:
    """The tenant's batches, newest first; `created_after`/`created_before` are exclusive."""
    page = queries.list_batches(session, tenant.id, limit=limit, cursor=cursor,
                                is_completed=None if status is None else status == "completed",
                                created_after=created_after, created_before=created_before)
    return BatchList(data=[batch_out(session, b) for b in page.rows], next_cursor=page.next_cursor)


@router.get("/{batch_id}", response_model=BatchOut, responses=errors(*READ_ONE), summary="Get a batch")
def get_batch(batch_id: Annotated[str, BATCH_ID], tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> BatchOut:
    """The batch with its counts, progress, GPU-seconds and, while active, queue position and ETA."""
    batch = queries.get_batch(session, tenant.id, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    return batch_out(session, batch, settings=settings)


@router.get("/{batch_id}/jobs", response_model=JobPage, responses=errors(*READ_ONE), summary="List a batch's jobs")
def list_batch_jobs(batch_id: Annotated[str, BATCH_ID], tenant: TenantDep, session: SessionDep,
                    settings: SettingsDep, store: StoreDep,
                    page: Annotated[int, Query(ge=1, le=1_000_000, description="page number, from 1")] = 1,
                    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="jobs per page")] = 50,
                    ) -> JobPage:
    """The batch's jobs in position order, with their results, a page at a time."""
    rows = queries.list_batch_jobs(session, tenant.id, batch_id, page=page, page_size=page_size)
    if rows is None:
        raise _not_found(batch_id)
    batch = queries.get_batch(session, tenant.id, batch_id)
    assert batch is not None
    has_more = page * page_size < batch.job_count
    return JobPage(items=[job_out(j, store, settings) for j in rows], page=page, page_size=page_size,
                   total=batch.job_count, next_page=page + 1 if has_more else None)


@router.get("/{batch_id}/manifest", response_model=Manifest, summary="Get a batch's manifest",
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                             "description": "JSON (a page) or CSV (every job)"}, **errors(*READ_ONE)})
def get_manifest(batch_id: Annotated[str, BATCH_ID], request: Request, tenant: TenantDep, session: SessionDep,
                 settings: SettingsDep, store: StoreDep,
                 format: Annotated[Literal["json", "csv"] | None, Query(  # noqa: A002 - the query name
                     description="json or csv; decides over the Accept header")] = None,
                 since: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="a report's seq: only the "
                                                    "jobs later reports counted final")] = None,
                 limit: Annotated[int, Query(ge=1, le=MAX_MANIFEST_PAGE, description="jobs per JSON page")] = 100,
                 cursor: Annotated[str | None, Query(max_length=20, json_schema_extra={"pattern": "^[0-9]{1,9}$"},
                                                     description="next_cursor of the previous page")] = None,
                 accept: Annotated[str | None, Header(description="text/csv for CSV")] = None) -> Response | Manifest:
    """Every job in position order with its status, result URL, error and timings, valid while
    the batch runs. JSON pages (``limit``, ``cursor``) with the counts by default; the whole
    batch as CSV with ``Accept: text/csv`` or ``?format=csv``."""
    batch = queries.get_batch(session, tenant.id, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    if not manifest.wants_csv(format, accept):
        return manifest.manifest_page(session, batch, store, settings, since=since, cursor=cursor, limit=limit)
    session.commit()  # the rows stream from short transactions of their own
    chunks = manifest.csv_chunks(request.app.state.sessions, batch.id, store, settings, since=since)
    return StreamingResponse(chunks, media_type=manifest.CSV_MEDIA_TYPE,
                             headers={"content-disposition": f'attachment; filename="batch-{batch.id}.csv"'})


@router.post("/{batch_id}/cancel", response_model=BatchOut, responses=errors(*READ_ONE), summary="Cancel a batch")
def cancel_batch(batch_id: Annotated[str, BATCH_ID], tenant: TenantDep, session: SessionDep) -> BatchOut:
    """Queued jobs are canceled at once; running ones stop at the next denoising step."""
    batch = jobs.cancel_batch(session, tenant.id, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    return batch_out(session, batch)
