"""Cluster metrics for Prometheus, read from the database at scrape time.

Owns: ``ClusterCollector`` (a ``prometheus_client`` custom collector: one short session and a
handful of aggregate queries per scrape) and ``estimated_gpu_seconds``, the backlog priced in
GPU-seconds that KEDA scales the GPU workers on and that ETA code may reuse. Leaves the HTTP
route to ``api.metrics``, the GPU worker's own process metrics to ``worker.worker_http``, and
every state change to ``worker.jobs``.

Metrics (every scrape; ``tenant`` is the tenant id):

- ``bagel_metrics_database_up`` — 1 when the scrape could read the database; 0 when it could
  not, and then no other metric of this collector is exposed for that scrape.
- ``bagel_backlog_jobs{tenant,priority,state}`` — jobs ``queued`` (state="waiting") and
  ``running`` (state="running"). Every tenant gets a sample for each priority and state (0 when
  it has none), so ``sum()`` is defined while any tenant exists.
- ``bagel_backlog_gpu_seconds{tenant,priority,state}`` — the same jobs priced in estimated
  GPU-seconds: ``JobCost.avg_gpu_seconds`` of the job's ``cost_key``, or
  ``DEFAULT_JOB_GPU_SECONDS`` when none is measured yet; a running job with a known step total
  counts the remaining fraction ``1 − progress_step/progress_total``. KEDA scales on it:
  ``sum(max by (tenant, priority, state) (bagel_backlog_gpu_seconds))`` (every API replica
  exports the same series, so a plain sum would count them once per replica).
- ``bagel_running_chunks`` — chunks claimed by a worker and not finished.
- ``bagel_oldest_waiting_seconds`` — age of the oldest queued job (0 when none).
- ``bagel_gpu_workers{state}`` — registered GPU workers (loading, ready, draining, blocked) seen within
  ``worker_dead_after_s``.
- ``bagel_job_retries`` — sum of ``attempts − 1`` over jobs with more than one attempt.
- ``bagel_lease_expiries`` — jobs whose error code is ``lease_expired``.
- ``bagel_jobs_failed{code}`` — failed jobs by error code ("unknown" when none is set).
- ``bagel_jobs_finished{task,status}`` — jobs in a terminal status, by task and status.
- ``bagel_dedupe_hits{tenant}`` — succeeded jobs answered from an identical job's result
  (``worker.dedupe``): no GPU work. Jobs waiting on an identical job are not in the backlog.
- ``bagel_webhook_pending`` — webhook deliveries still pending.
- ``bagel_webhook_lag_seconds`` — age (since creation) of the oldest pending delivery that is
  due (``next_attempt_at ≤ now``); 0 when none is due.
- ``bagel_webhook_failed`` — deliveries that gave up (status failed).
- ``bagel_job_latency_seconds{task}`` — histogram of ``finished_at − queued_at`` over the jobs
  that succeeded in the last hour (at most the 10,000 most recent), buckets 1, 5, 15, 60, 300,
  900, 3600 s and +Inf.

The retry, expiry, failure, finished and webhook numbers are gauges computed from rows: they
count rows still in the database (retention and cleanup make them go down), so use them as
levels, or ``delta()``/``deriv()``, never ``rate()``.

On PostgreSQL each scrape sets a statement timeout, so a slow database costs a scrape, not a
stuck one. On SQLite every transaction is ``BEGIN IMMEDIATE`` (``worker.db``): a scrape holds
the write lock for the few milliseconds its queries take.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import Float, case, cast, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from worker.jobs import DEFAULT_JOB_GPU_SECONDS, LEASE_EXPIRED
from worker.models import (
    TASK_NAMES,
    TERMINAL_STATUSES,
    Chunk,
    DeliveryStatus,
    Job,
    JobCost,
    JobStatus,
    Priority,
    Tenant,
    WebhookDelivery,
    Worker,
    WorkerState,
    utcnow,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
LATENCY_WINDOW_S = 3600
LATENCY_MAX_JOBS = 10_000
SCRAPE_STATEMENT_TIMEOUT_MS = 5000
BACKLOG_STATES = {JobStatus.queued: "waiting", JobStatus.running: "running"}

BacklogKey = tuple[str, str, str]  # (tenant id, priority, state)


def estimated_gpu_seconds(session: Session) -> dict[BacklogKey, tuple[int, float]]:
    """The active backlog priced in GPU-seconds: ``{(tenant_id, priority, state): (jobs,
    seconds)}`` with state "waiting" (queued) or "running"; only keys with at least one job.

    A job costs its ``cost_key``'s measured average (``JobCost``), else
    ``DEFAULT_JOB_GPU_SECONDS``; a running job with ``progress_total > 0`` costs the remaining
    fraction of that; a job waiting on an identical one (``dedupe_of``) costs nothing and is not
    counted. One grouped query: the rows are (tenant, priority, status, cost_key)."""
    fraction = cast(Job.progress_step, Float) / Job.progress_total
    remaining = case(
        (Job.status != JobStatus.running, 1.0),
        (Job.progress_total <= 0, 1.0),
        (Job.progress_step >= Job.progress_total, 0.0),
        else_=1.0 - fraction,
    )
    price = func.coalesce(JobCost.avg_gpu_seconds, DEFAULT_JOB_GPU_SECONDS)
    rows = session.execute(
        select(Job.tenant_id, Job.priority, Job.status, price, func.count(), func.sum(remaining))
        .select_from(Job)
        .outerjoin(JobCost, JobCost.cost_key == Job.cost_key)
        .where(Job.status.in_(list(BACKLOG_STATES)), Job.dedupe_of.is_(None))
        .group_by(Job.tenant_id, Job.priority, Job.status, Job.cost_key, JobCost.avg_gpu_seconds)
    ).all()
    out: dict[BacklogKey, tuple[int, float]] = {}
    for tenant_id, priority, status, unit_s, count, units in rows:
        key = (tenant_id, str(priority), BACKLOG_STATES[JobStatus(status)])
        jobs, seconds = out.get(key, (0, 0.0))
        out[key] = (jobs + int(count), seconds + float(unit_s) * float(units or 0.0))
    return out


class ClusterCollector(Collector):
    """Reads the cluster's state at scrape time; register it on a ``CollectorRegistry``.

    ``sessions`` is the service's session factory (``worker.db.session_factory``). A scrape
    that cannot reach the database yields only ``bagel_metrics_database_up 0``."""

    def __init__(self, sessions: sessionmaker[Session], *, worker_dead_after_s: float) -> None:
        self._sessions = sessions
        self._worker_dead_after_s = worker_dead_after_s

    def collect(self) -> Iterator[Metric]:
        try:
            with self._sessions() as session:
                families = self._read(session, utcnow())  # closing the session rolls back: no writes
        except Exception as exc:  # noqa: BLE001 — a scrape reports the outage, it never raises
            log.warning("metrics scrape could not read the database: %s: %s", exc.__class__.__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            yield _gauge("bagel_metrics_database_up", "1 when the scrape could read the database", 0)
            return
        yield _gauge("bagel_metrics_database_up", "1 when the scrape could read the database", 1)
        yield from families

    def _read(self, session: Session, now: datetime) -> list[Metric]:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL statement_timeout = {SCRAPE_STATEMENT_TIMEOUT_MS}"))
        return [*_backlog(session, now), *_chunks_and_workers(session, now, self._worker_dead_after_s),
                *_outcomes(session), *_webhooks(session, now), _latency(session, now)]


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _backlog(session: Session, now: datetime) -> list[Metric]:
    jobs = GaugeMetricFamily("bagel_backlog_jobs", "Jobs waiting (queued) or running",
                             labels=["tenant", "priority", "state"])
    seconds = GaugeMetricFamily("bagel_backlog_gpu_seconds", "Estimated GPU-seconds of the waiting and "
                                "running jobs (measured average per kind, remaining fraction when running)",
                                labels=["tenant", "priority", "state"])
    priced = estimated_gpu_seconds(session)
    tenant_ids = set(session.scalars(select(Tenant.id)).all()) | {key[0] for key in priced}
    for tenant_id in sorted(tenant_ids):
        for priority in Priority:
            for state in BACKLOG_STATES.values():
                count, total_s = priced.get((tenant_id, priority.value, state), (0, 0.0))
                jobs.add_metric([tenant_id, priority.value, state], count)
                seconds.add_metric([tenant_id, priority.value, state], total_s)
    waiting_since = session.scalar(select(func.min(Job.queued_at)).where(Job.status == JobStatus.queued))
    oldest = _gauge("bagel_oldest_waiting_seconds", "Age of the oldest queued job (0 when none)",
                    _age_s(waiting_since, now))
    return [jobs, seconds, oldest]


def _chunks_and_workers(session: Session, now: datetime, dead_after_s: float) -> list[Metric]:
    running = session.scalar(select(func.count()).select_from(Chunk)
                             .where(Chunk.claimed_at.is_not(None), Chunk.finished_at.is_(None)))
    counts = dict(session.execute(
        select(Worker.state, func.count())
        .where(Worker.last_seen >= now - timedelta(seconds=dead_after_s))
        .group_by(Worker.state)
    ).all())
    workers = GaugeMetricFamily("bagel_gpu_workers", "GPU workers seen within worker_dead_after_s, by state",
                                labels=["state"])
    for state in WorkerState:
        workers.add_metric([state.value], counts.get(state, 0))
    return [_gauge("bagel_running_chunks", "Chunks claimed by a worker and not finished", running or 0), workers]


def _outcomes(session: Session) -> list[Metric]:
    retries = session.scalar(select(func.coalesce(func.sum(Job.attempts - 1), 0)).where(Job.attempts > 1))
    expiries = session.scalar(select(func.count()).select_from(Job).where(Job.error_code == LEASE_EXPIRED))
    failed = GaugeMetricFamily("bagel_jobs_failed", "Failed jobs still in the database, by error code",
                               labels=["code"])
    for code, count in session.execute(select(Job.error_code, func.count())
                                       .where(Job.status == JobStatus.failed).group_by(Job.error_code)).all():
        failed.add_metric([code or "unknown"], count)
    finished = GaugeMetricFamily("bagel_jobs_finished", "Jobs in a terminal status still in the database",
                                 labels=["task", "status"])
    for task, status, count in session.execute(
            select(Job.task, Job.status, func.count())
            .where(Job.status.in_(list(TERMINAL_STATUSES))).group_by(Job.task, Job.status)).all():
        finished.add_metric([task, str(status)], count)
    hits = GaugeMetricFamily("bagel_dedupe_hits", "Succeeded jobs answered from an identical job's result "
                             "(no GPU work) still in the database", labels=["tenant"])
    for tenant, count in session.execute(
            select(Job.tenant_id, func.count())
            .where(Job.status == JobStatus.succeeded, Job.dedupe_of.is_not(None)).group_by(Job.tenant_id)).all():
        hits.add_metric([tenant], count)
    return [
        _gauge("bagel_job_retries", "Extra attempts (attempts - 1) of jobs still in the database", retries or 0),
        _gauge("bagel_lease_expiries", "Jobs whose last error is an expired lease", expiries or 0),
        failed, finished, hits,
    ]


def _webhooks(session: Session, now: datetime) -> list[Metric]:
    counts = dict(session.execute(select(WebhookDelivery.status, func.count())
                                  .group_by(WebhookDelivery.status)).all())
    oldest_due = session.scalar(
        select(func.min(WebhookDelivery.created_at))
        .where(WebhookDelivery.status == DeliveryStatus.pending, WebhookDelivery.next_attempt_at <= now))
    return [
        _gauge("bagel_webhook_pending", "Webhook deliveries still pending", counts.get(DeliveryStatus.pending, 0)),
        _gauge("bagel_webhook_lag_seconds", "Age of the oldest pending delivery that is due (0 when none)",
               _age_s(oldest_due, now)),
        _gauge("bagel_webhook_failed", "Webhook deliveries that gave up", counts.get(DeliveryStatus.failed, 0)),
    ]


def _latency(session: Session, now: datetime) -> Metric:
    rows = session.execute(
        select(Job.task, Job.queued_at, Job.finished_at)
        .where(Job.status == JobStatus.succeeded, Job.finished_at >= now - timedelta(seconds=LATENCY_WINDOW_S))
        .order_by(Job.finished_at.desc()).limit(LATENCY_MAX_JOBS)
    ).all()
    observed: dict[str, list[float]] = {task: [] for task in TASK_NAMES}
    for task, queued_at, finished_at in rows:
        observed.setdefault(task, []).append(max((finished_at - queued_at).total_seconds(), 0.0))
    family = HistogramMetricFamily("bagel_job_latency_seconds", "Queued to finished, jobs that succeeded "
                                   "in the last hour (at most the 10,000 most recent)", labels=["task"])
    for task, values in observed.items():
        family.add_metric([task], _cumulative_buckets(values), sum_value=sum(values))
    return family


def _cumulative_buckets(values: list[float]) -> list[tuple[str, float]]:
    buckets = [(floatToGoString(b), float(sum(1 for v in values if v <= b))) for b in LATENCY_BUCKETS_S]
    return [*buckets, ("+Inf", float(len(values)))]


def _age_s(since: Any, now: datetime) -> float:
    return max((now - since).total_seconds(), 0.0) if since is not None else 0.0
