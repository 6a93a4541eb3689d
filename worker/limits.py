"""Per-tenant submission limits, checked inside the submit transaction before anything is inserted.

Owns: the three limits a submission can break — ``requests_per_minute`` (single jobs and batches
created in the last 60 s), ``max_waiting_jobs`` (queued jobs plus the new ones) and
``monthly_gpu_seconds`` (GPU time of the jobs finished this UTC calendar month) — and the
errors that refuse it (``worker.errors.LimitExceeded``). A limit of None is unlimited and costs
no query. Leaves storing the limits to ``worker.tenants``, the HTTP mapping to ``api/errors``,
and ``weight`` and ``max_running_chunks`` to the dispatcher (``worker.scheduler``).

The limits come from the tenant row the API-key lookup just read. Only the rate and the
waiting-jobs limits count rows that concurrent submissions add: when either is set, the checks
lock the tenant row first (``FOR NO KEY UPDATE`` on PostgreSQL, held until the submit commits)
and re-read the limits under the lock, so two concurrent submissions of one tenant cannot both
see room for one more; SQLite serializes writers anyway (``BEGIN IMMEDIATE``). A tenant
without them takes no lock: its submissions run side by side (a lock held from the check to
the commit would queue every submission of a busy tenant behind the one before). Running work
is never affected: these are submit checks only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.errors import GpuBudgetExhausted, NotFound, RateLimited, TooManyWaiting
from worker.models import Batch, Job, JobStatus, Tenant

RATE_WINDOW_S = 60
# Retry-After of a too_many_waiting refusal: the queue drains as GPUs finish chunks, so "soon".
WAITING_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits as stored (None: unlimited)."""

    requests_per_minute: int | None
    max_waiting_jobs: int | None
    monthly_gpu_seconds: float | None


def check_submission(session: Session, tenant: Tenant, *, new_jobs: int, now: datetime) -> None:
    """Raise a ``LimitExceeded`` when submitting ``new_jobs`` jobs (one request) now would break a
    limit of ``tenant`` (its row as the request read it). Checks in order: rate, monthly GPU
    budget, waiting jobs. With a rate or waiting-jobs limit, leaves the tenant row locked until the
    caller's transaction ends."""
    limits = TenantLimits(tenant.requests_per_minute, tenant.max_waiting_jobs, tenant.monthly_gpu_seconds)
    if limits.requests_per_minute is not None or limits.max_waiting_jobs is not None:
        limits = _lock_tenant(session, tenant.id)
    if limits.requests_per_minute is not None:
        check_rate(session, tenant.id, limits.requests_per_minute, now)
    if limits.monthly_gpu_seconds is not None:
        check_gpu_budget(session, tenant.id, limits.monthly_gpu_seconds, now)
    if limits.max_waiting_jobs is not None:
        check_waiting(session, tenant.id, limits.max_waiting_jobs, new_jobs)


def check_rate(session: Session, tenant_id: str, limit: int, now: datetime) -> None:
    """At most ``limit`` submissions (a single job or a batch each) in the 60 s before ``now``."""
    since = now - timedelta(seconds=RATE_WINDOW_S)
    singles = (select(Job.created_at).where(Job.tenant_id == tenant_id, Job.batch_id.is_(None),
                                            Job.created_at > since))
    batches = select(Batch.created_at).where(Batch.tenant_id == tenant_id, Batch.created_at > since)
    count = (session.scalar(select(func.count()).select_from(singles.subquery()))
             + session.scalar(select(func.count()).select_from(batches.subquery())))
    if count < limit:
        return
    # Room for one more once all but (limit - 1) of the counted submissions left the window: the
    # (count - limit + 1)-th oldest decides (the oldest one when exactly at the limit). A limit
    # of 0 never has room: say "a window from now".
    retry_after_s = RATE_WINDOW_S
    if limit > 0:
        nth = count - limit + 1
        oldest = sorted([*session.scalars(singles.order_by(Job.created_at).limit(nth)),
                         *session.scalars(batches.order_by(Batch.created_at).limit(nth))])
        leaves_at = oldest[nth - 1] + timedelta(seconds=RATE_WINDOW_S)
        retry_after_s = max(1, math.ceil((leaves_at - now).total_seconds()))
    raise RateLimited(f"requests_per_minute: {count} submissions in the last {RATE_WINDOW_S} s reach the "
                      f"tenant's limit of {limit} per minute; retry in {retry_after_s} s",
                      retry_after_s=retry_after_s)


def check_waiting(session: Session, tenant_id: str, limit: int, new_jobs: int) -> None:
    """Queued jobs of the tenant plus ``new_jobs`` at most ``limit``."""
    waiting = session.scalar(select(func.count()).select_from(Job)
                             .where(Job.tenant_id == tenant_id, Job.status == JobStatus.queued))
    if waiting + new_jobs <= limit:
        return
    raise TooManyWaiting(f"max_waiting_jobs: {waiting} queued + {new_jobs} new job(s) exceeds the tenant's limit "
                         f"of {limit} waiting jobs", retry_after_s=WAITING_RETRY_AFTER_S)


def check_gpu_budget(session: Session, tenant_id: str, budget_s: float, now: datetime) -> None:
    """GPU-seconds of the tenant's jobs finished in ``now``'s UTC calendar month below ``budget_s``."""
    start, reset = month_bounds(now)
    used = gpu_seconds_used(session, tenant_id, start, reset)
    if used < budget_s:
        return
    raise GpuBudgetExhausted(
        f"monthly_gpu_seconds: {used:.1f} GPU-seconds used this month reach the tenant's budget of "
        f"{budget_s:g} GPU-seconds; the budget resets at {reset.isoformat()}")


def gpu_seconds_used(session: Session, tenant_id: str, start: datetime, end: datetime) -> float:
    """Sum of ``Job.gpu_seconds`` of the tenant's jobs finished in [start, end)."""
    used = session.scalar(select(func.coalesce(func.sum(Job.gpu_seconds), 0.0))
                          .where(Job.tenant_id == tenant_id, Job.finished_at >= start, Job.finished_at < end))
    return float(used or 0.0)


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """Start of ``now``'s UTC calendar month and of the next one."""
    now = now.astimezone(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    reset = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return start, reset


def _lock_tenant(session: Session, tenant_id: str) -> TenantLimits:
    # FOR NO KEY UPDATE: serializes this tenant's submissions without blocking the KEY SHARE
    # locks that workers take when they insert rows referring to the tenant (outbox rows).
    row = session.execute(
        select(Tenant.requests_per_minute, Tenant.max_waiting_jobs, Tenant.monthly_gpu_seconds)
        .where(Tenant.id == tenant_id).with_for_update(key_share=True)).one_or_none()
    if row is None:
        raise NotFound(f"tenant: no tenant with id {tenant_id!r}", field="tenant_id")
    return TenantLimits(*row)
