"""Read-only queries: single rows (tenant-scoped for the API: another tenant's id reads as
None; any tenant for the workers), batch counts and progress, job, batch and webhook delivery
listings (the delivery log, with every attempt), and usage.

Owns: the listings' filters and keyset pagination (newest first by ``created_at``, then ``id``,
so rows created in the same instant — a batch's jobs — are neither repeated nor skipped across
pages) with their opaque cursor, and the per-day usage totals. Every query is scoped to one
tenant. Changes nothing: state changes belong to ``worker.jobs``, the response shapes to ``api/``.

A cursor is the urlsafe base64 of ``<created_at ISO>|<id>`` of the last row of a page.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from worker.errors import InvalidParameter
from worker.models import Adapter, Batch, DeliveryStatus, File, Job, JobStatus, WebhookAttempt, WebhookDelivery
from worker.params import check_text

Row = TypeVar("Row", Job, Batch, WebhookDelivery)
T = TypeVar("T")
UNDERSTAND = "understand"  # the one task whose output is text, not an image


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of rows and the cursor of the next page (None on the last)."""

    rows: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class UsageRow:
    """What one task did on one UTC day."""

    day: date
    task: str
    jobs: int
    images: int
    gpu_seconds: float


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = f"{created_at.astimezone(UTC).isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) of a cursor made by ``encode_cursor``; anything else is an
    ``InvalidParameter`` naming ``cursor``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, row_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(stamp)
        check_text(row_id, "cursor", allow_whitespace=False)
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidParameter):
        raise InvalidParameter(f"cursor: {cursor[:40]!r} is not a cursor this API returned", field="cursor") from None
    if created_at.tzinfo is None or not 1 <= len(row_id) <= 64:
        raise InvalidParameter(f"cursor: {cursor[:40]!r} is not a cursor this API returned", field="cursor")
    return created_at, row_id


def list_jobs(session: Session, tenant_id: str, *, limit: int, cursor: str | None = None,
              status: JobStatus | None = None, task: str | None = None, batch_id: str | None = None,
              created_after: datetime | None = None, created_before: datetime | None = None) -> Page[Job]:
    """The tenant's jobs, newest first, filtered (``created_after``/``created_before`` exclusive)."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    if task is not None:
        query = query.where(Job.task == task)
    if batch_id is not None:
        check_text(batch_id, "batch_id", allow_whitespace=False)
        query = query.where(Job.batch_id == batch_id)
    return _page(session, query, Job, limit=limit, cursor=cursor, after=created_after, before=created_before)


def list_batches(session: Session, tenant_id: str, *, limit: int, cursor: str | None = None,
                 is_completed: bool | None = None, created_after: datetime | None = None,
                 created_before: datetime | None = None) -> Page[Batch]:
    """The tenant's batches, newest first; ``is_completed`` True: no job left queued or running."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if is_completed is not None:
        query = query.where(Batch.completed_at.is_not(None) if is_completed else Batch.completed_at.is_(None))
    return _page(session, query, Batch, limit=limit, cursor=cursor, after=created_after, before=created_before)


def usage(session: Session, tenant_id: str, first: date, last: date) -> list[UsageRow]:
    """Per UTC day and task, the tenant's jobs finished from ``first`` to ``last`` (inclusive):
    how many, how many images (succeeded, task other than understand) and their GPU-seconds.
    Days without finished jobs are absent; rows are sorted by day, then task."""
    start = datetime.combine(first, time(), tzinfo=UTC)
    end = datetime.combine(last + timedelta(days=1), time(), tzinfo=UTC)
    day = _utc_day(session, Job.finished_at)
    rows = session.execute(
        select(day, Job.task, Job.status, func.count(), func.sum(Job.gpu_seconds))
        .where(Job.tenant_id == tenant_id, Job.finished_at >= start, Job.finished_at < end)
        .group_by(day, Job.task, Job.status)).all()
    session.commit()
    totals: dict[tuple[date, str], list[Any]] = {}
    for raw_day, task, status, count, gpu_s in rows:
        entry = totals.setdefault((_as_date(raw_day), task), [0, 0, 0.0])
        entry[0] += count
        if JobStatus(status) == JobStatus.succeeded and task != UNDERSTAND:
            entry[1] += count
        entry[2] += float(gpu_s or 0.0)
    return [UsageRow(day=d, task=t, jobs=n, images=img, gpu_seconds=round(gpu_s, 3))
            for (d, t), (n, img, gpu_s) in sorted(totals.items())]


def _page(session: Session, query: Select[tuple[Row]], model: type[Row], *, limit: int, cursor: str | None,
          after: datetime | None, before: datetime | None) -> Page[Row]:
    if after is not None:
        query = query.where(model.created_at > _aware(after))
    if before is not None:
        query = query.where(model.created_at < _aware(before))
    if cursor is not None:
        created_at, row_id = decode_cursor(cursor)
        query = query.where(or_(model.created_at < created_at,
                                and_(model.created_at == created_at, model.id < row_id)))
    rows: Sequence[Row] = session.scalars(
        query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
        .execution_options(populate_existing=True)).all()
    session.commit()
    if len(rows) <= limit:
        return Page(list(rows), None)
    last = rows[limit - 1]
    return Page(list(rows[:limit]), encode_cursor(last.created_at, last.id))


def _aware(moment: datetime) -> datetime:
    """Query bounds without a zone are UTC, as every stored time is."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _utc_day(session: Session, column: Any) -> Any:
    # SQLite stores naive UTC wall time, so date() is the UTC day; PostgreSQL's date() of a
    # timestamptz would use the session's TimeZone, hence the explicit conversion to UTC.
    if session.get_bind().dialect.name == "postgresql":
        return func.date(func.timezone("UTC", column))
    return func.date(column)


def _as_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


# ---------------------------------------------------------------------------------------------
# Single rows and batch figures (tenant-scoped: another tenant's id reads as None)


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)
                          .execution_options(populate_existing=True))


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
                          .execution_options(populate_existing=True))


def get_file(session: Session, tenant_id: str, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))


def get_adapter(session: Session, tenant_id: str, adapter_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant_id))


def list_adapters(session: Session, tenant_id: str) -> list[Adapter]:
    """The tenant's adapters, newest first."""
    return list(session.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id)
                                .order_by(Adapter.created_at.desc(), Adapter.id)).all())


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


def batch_gpu_seconds(session: Session, batch_id: str) -> float:
    """GPU-seconds the batch's jobs used so far."""
    return float(session.scalar(select(func.coalesce(func.sum(Job.gpu_seconds), 0.0))
                                .where(Job.batch_id == batch_id)) or 0.0)


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
    return _load(session, list(job_ids))


def chunk_jobs(session: Session, chunk_id: str) -> list[Job]:
    """Every job of a chunk, fresh, in position order (worker side)."""
    return list(session.scalars(select(Job).where(Job.chunk_id == chunk_id).order_by(Job.position)
                                .execution_options(populate_existing=True)).all())


def _load(session: Session, ids: Sequence[str]) -> list[Job]:
    rows = session.scalars(select(Job).where(Job.id.in_(list(ids))).order_by(Job.position)
                           .execution_options(populate_existing=True)).all()
    session.commit()
    return list(rows)


# ---------------------------------------------------------------------------------------------
# The webhook delivery log (tenant-scoped)


def list_deliveries(session: Session, tenant_id: str, *, limit: int, cursor: str | None = None,
                    event: str | None = None, status: DeliveryStatus | None = None, job_id: str | None = None,
                    batch_id: str | None = None, created_after: datetime | None = None,
                    created_before: datetime | None = None) -> Page[WebhookDelivery]:
    """The tenant's webhook deliveries, newest first, filtered (time bounds exclusive)."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id)
    if event is not None:
        query = query.where(WebhookDelivery.event == event)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if job_id is not None:
        check_text(job_id, "job_id", allow_whitespace=False)
        query = query.where(WebhookDelivery.job_id == job_id)
    if batch_id is not None:
        check_text(batch_id, "batch_id", allow_whitespace=False)
        query = query.where(WebhookDelivery.batch_id == batch_id)
    return _page(session, query, WebhookDelivery, limit=limit, cursor=cursor, after=created_after,
                 before=created_before)


def get_delivery(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery | None:
    return session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                                        WebhookDelivery.tenant_id == tenant_id)
                          .execution_options(populate_existing=True))


def delivery_attempts(session: Session, delivery_ids: Iterable[str]) -> dict[str, list[WebhookAttempt]]:
    """Every attempt of each delivery, oldest first (one query for a whole page). Commits
    nothing: a replay reads them inside its own transaction."""
    ids = list(set(delivery_ids))
    out: dict[str, list[WebhookAttempt]] = {i: [] for i in ids}
    if not ids:
        return out
    for attempt in session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids))
                                   .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt_no)).all():
        out[attempt.delivery_id].append(attempt)
    return out
