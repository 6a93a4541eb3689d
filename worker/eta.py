"""Queue position and ETA of a waiting or running job or batch.

Owns: ``job_queue`` and ``batch_queue``, a few aggregate queries each, cheap enough for every
``GET``. The model follows the dispatcher (``scheduler.py``):

- a job's **tenant position** is the number of its tenant's waiting jobs dispatched before it
  (interactive before batch, then age);
- its **position** in the global order adds, for every other tenant, the jobs that weighted
  fair share hands out while this tenant's ``tenant position + 1`` jobs go:
  ``min(their waiting, (tenant position + 1) · their weight / this weight)``, plus every job
  already in a chunk but not yet running;
- its **ETA** is the GPU-seconds of all that work plus the running jobs' remainders (each job
  priced by its kind's measured moving average, ``job_costs``, else the default) and its own
  cost, divided by the live GPU workers (none live: no ETA). A running job's ETA is its own
  remaining fraction.

A batch reports its first waiting job's position and its last job's ETA. The error of these
estimates against real completion times is measured in ``tests/test_eta.py`` (see README).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, or_, select

from worker.jobs import DEFAULT_JOB_GPU_SECONDS
from worker.models import Job, JobCost, JobStatus, Priority, Tenant, utcnow
from worker.scheduler import live_workers

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings


@dataclass(frozen=True)
class QueueInfo:
    position: int  # jobs dispatched before it, all tenants (0: next, or running)
    tenant_position: int  # its own tenant's jobs before it
    eta_s: float | None  # seconds until it is expected to finish; None: no live GPU worker
    eta_at: datetime | None
    live_workers: int


def _rank(priority: object) -> int:
    return 0 if str(priority) == Priority.interactive.value else 1


def _ahead_of(job: Job):
    """The tenant's waiting jobs dispatched before ``job``: interactive before batch, then age,
    then position in the batch."""
    earlier = and_(Job.priority == job.priority,
                   or_(Job.queued_at < job.queued_at, and_(Job.queued_at == job.queued_at, Job.position < job.position)))
    if _rank(job.priority) == 0:
        return earlier
    return or_(Job.priority == Priority.interactive, earlier)


def job_queue(session: Session, settings: Settings, job: Job) -> QueueInfo | None:
    """Position and ETA of an active job (None once it is finished); a job waiting on an identical
    one (``worker.dedupe``) has that one's."""
    status = JobStatus(job.status)
    if status.is_terminal:
        return None
    if job.dedupe_of is not None:  # it succeeds when the identical job it waits on does
        runner = session.get(Job, job.dedupe_of)
        return job_queue(session, settings, runner) if runner is not None else None
    now = utcnow()
    workers = live_workers(session, settings, now)
    costs = dict(session.execute(select(JobCost.cost_key, JobCost.avg_gpu_seconds)).all())
    own = float(costs.get(job.cost_key, DEFAULT_JOB_GPU_SECONDS))
    if status == JobStatus.running:
        left = 1.0 - job.progress_step / job.progress_total if job.progress_total else 1.0
        return _info(0, 0, own * max(left, 0.0), workers, now, divide=False)
    waiting = (Job.status == JobStatus.queued) & Job.chunk_id.is_(None)
    tenant_position = int(session.scalar(select(func.count()).select_from(Job).where(
        waiting, Job.tenant_id == job.tenant_id, _ahead_of(job))) or 0) if job.chunk_id is None else 0
    weights = dict(session.execute(select(Tenant.id, Tenant.weight)).all())
    mine = max(float(weights.get(job.tenant_id) or 1.0), 1e-6)
    # other tenants' waiting jobs count up to their fair share of this job's turn
    share = (tenant_position + 1) / mine
    capped_jobs, capped_s = 0, 0.0
    by_tenant: dict[str, list[tuple[int, float]]] = {}
    for tenant, key, count in session.execute(
            select(Job.tenant_id, Job.cost_key, func.count()).where(waiting, Job.tenant_id != job.tenant_id)
            .group_by(Job.tenant_id, Job.cost_key)):
        by_tenant.setdefault(tenant, []).append((int(count), float(costs.get(key, DEFAULT_JOB_GPU_SECONDS))))
    for tenant, kinds in by_tenant.items():
        room = share * max(float(weights.get(tenant) or 1.0), 1e-6)
        for count, unit in kinds:
            take = min(count, room)
            capped_jobs, capped_s = capped_jobs + int(take), capped_s + take * unit
            room -= take
    mine_ahead_s = 0.0
    if job.chunk_id is None:
        for key, count in session.execute(select(Job.cost_key, func.count()).where(
                waiting, Job.tenant_id == job.tenant_id, _ahead_of(job)).group_by(Job.cost_key)):
            mine_ahead_s += int(count) * float(costs.get(key, DEFAULT_JOB_GPU_SECONDS))
    dispatched_s = 0.0
    for key, count, done in session.execute(
            select(Job.cost_key, func.count(), func.sum(Job.progress_step * 1.0 / func.nullif(Job.progress_total, 0)))
            .where(or_(Job.status == JobStatus.running, (Job.status == JobStatus.queued) & Job.chunk_id.is_not(None)),
                   Job.id != job.id).group_by(Job.cost_key)):
        unit = float(costs.get(key, DEFAULT_JOB_GPU_SECONDS))
        dispatched_s += unit * (int(count) - float(done or 0.0))
    queued_dispatched = int(session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.queued, Job.chunk_id.is_not(None), Job.id != job.id)) or 0)
    position = tenant_position + capped_jobs + (queued_dispatched if job.chunk_id is None else 0)
    work_s = mine_ahead_s + capped_s + dispatched_s + own
    return _info(position, tenant_position, work_s, workers, now, divide=True)


def _info(position: int, tenant_position: int, work_s: float, workers: int, now: datetime, *,
          divide: bool) -> QueueInfo:
    if workers == 0:
        return QueueInfo(position, tenant_position, None, None, 0)
    eta = work_s / workers if divide else work_s
    return QueueInfo(position, tenant_position, round(eta, 2), now + timedelta(seconds=eta), workers)


def batch_queue(session: Session, settings: Settings, batch_id: str) -> QueueInfo | None:
    """The first waiting job's position, the last active job's ETA; None when none is active."""
    active = select(Job).where(Job.batch_id == batch_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
    first = session.scalar(active.order_by(Job.status.desc(), Job.queued_at, Job.position).limit(1))
    last = session.scalar(active.order_by(Job.queued_at.desc(), Job.position.desc()).limit(1))
    if first is None or last is None:
        return None
    head, tail = job_queue(session, settings, first), job_queue(session, settings, last)
    assert head is not None and tail is not None
    return QueueInfo(head.position, head.tenant_position, tail.eta_s, tail.eta_at, tail.live_workers)
