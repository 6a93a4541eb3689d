"""``/v1/usage``: what the tenant's finished jobs used, per UTC day and task, over a date range."""

from __future__ import annotations

from calendar import monthrange
from datetime import UTC, date, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from api.contract import READ, errors
from api.deps import SessionDep, TenantDep
from api.schemas import Usage, UsageDay, UsageTotals
from worker import queries
from worker.errors import InvalidParameter

router = APIRouter(prefix="/v1/usage", tags=["usage"])
MAX_RANGE_DAYS = 366


@router.get("", response_model=Usage, responses=errors(*READ), summary="Get usage")
def get_usage(tenant: TenantDep, session: SessionDep,
              first: Annotated[date | None, Query(alias="from", description="YYYY-MM-DD, UTC; default: "
                                                  "the first day of this month")] = None,
              last: Annotated[date | None, Query(alias="to", description="YYYY-MM-DD, UTC, inclusive; "
                                                 "default: the last day of this month")] = None) -> Usage:
    """Jobs finished (any final status), images made and GPU-seconds used, per day and task;
    `from` to `to`, at most 366 days."""
    today = datetime.now(UTC).date()
    first = first or today.replace(day=1)
    last = last or today.replace(day=monthrange(today.year, today.month)[1])
    days = (last - first).days + 1
    if days < 1:
        raise InvalidParameter(f"to: {last} is before from {first}", field="to")
    if days > MAX_RANGE_DAYS:
        raise InvalidParameter(f"to: {first}..{last} spans {days} days, over the {MAX_RANGE_DAYS} day limit",
                               field="to")
    rows = queries.usage(session, tenant.id, first, last)
    totals = UsageTotals(jobs=sum(r.jobs for r in rows), images=sum(r.images for r in rows),
                         gpu_seconds=round(sum(r.gpu_seconds for r in rows), 3))
    return Usage(from_=first, to=last, totals=totals,
                 days=[UsageDay(date=r.day, task=r.task, jobs=r.jobs, images=r.images, gpu_seconds=r.gpu_seconds)
                       for r in rows])
