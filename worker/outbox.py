"""The webhook outbox: the rows that announce state changes, written in the same transaction
as the change, and the delivery bookkeeping.

Owns: event names and payloads (``job.succeeded``, ``job.failed``, ``job.expired``,
``batch.completed`` with its manifest), batch completion (exactly once: the batch row lock,
``SELECT … FOR NO KEY UPDATE``, taken after the job update and before any outbox insert, then a
count of active jobs, so two workers finishing a batch's last two jobs concurrently cannot both
miss it on PostgreSQL; SQLite serializes writers anyway), test pings, claiming due deliveries,
recording attempts, and replays (a delivered or failed delivery back to pending, same id and
payload). Leaves job transitions to ``jobs.py`` (which calls in here), ``batch.progress`` (its
throttle and payload) to ``progress.py`` and sending to ``webhooks.py``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from worker.errors import DeliveryPending
from worker.models import (
    ACTIVE_STATUSES,
    Batch,
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)

log = logging.getLogger(__name__)

EVENT_JOB_SUCCEEDED = "job.succeeded"
EVENT_JOB_FAILED = "job.failed"
EVENT_JOB_EXPIRED = "job.expired"
EVENT_BATCH_PROGRESS = "batch.progress"
EVENT_BATCH_COMPLETED = "batch.completed"
EVENT_WEBHOOK_TEST = "webhook.test"
EVENTS = (EVENT_JOB_SUCCEEDED, EVENT_JOB_FAILED, EVENT_JOB_EXPIRED, EVENT_BATCH_PROGRESS, EVENT_BATCH_COMPLETED,
          EVENT_WEBHOOK_TEST)
REPLAYABLE = (DeliveryStatus.delivered, DeliveryStatus.failed)
TEST_MESSAGE = "a test webhook from bagel-jobs"

_NO_SYNC = {"synchronize_session": False}


def due_deliveries(session: Session, now: datetime, limit: int, *, claim_s: float = 60.0) -> list[WebhookDelivery]:
    """Pending deliveries due at ``now``, oldest first. Each returned row is claimed for
    ``claim_s`` (its ``next_attempt_at`` moved forward by a conditional update), so concurrent
    webhook workers do not send the same row twice; ``record_attempt`` sets the real next time."""
    candidates = session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == DeliveryStatus.pending, WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)
    ).all()
    claimed: list[str] = []
    for delivery_id in candidates:
        rows = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.pending,
                   WebhookDelivery.next_attempt_at <= now)
            .values(next_attempt_at=now + timedelta(seconds=claim_s))
            .execution_options(**_NO_SYNC)
        ).rowcount
        if rows:
            claimed.append(delivery_id)
    session.commit()
    if not claimed:
        return []
    rows_by_id = {d.id: d for d in session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id.in_(claimed))
        .execution_options(populate_existing=True)).all()}
    session.commit()
    return [rows_by_id[i] for i in claimed]


def record_attempt(session: Session, delivery_id: str, *, status_code: int | None, error: str | None,
                   duration_ms: float, delivered: bool, next_attempt_at: datetime | None,
                   address: str | None = None) -> None:
    """Store one delivery attempt (with the address it connected to) and the delivery's new
    state: ``delivered``; ``pending`` until ``next_attempt_at``; or ``failed`` when not
    delivered and no next attempt is planned."""
    delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
    if delivery is None or delivery.status != DeliveryStatus.pending:
        session.commit()
        return
    now = utcnow()
    if delivered:
        status = DeliveryStatus.delivered
    elif next_attempt_at is None:
        status = DeliveryStatus.failed
    else:
        status = DeliveryStatus.pending
    rows = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.pending,
               WebhookDelivery.attempts == delivery.attempts)
        .values(attempts=WebhookDelivery.attempts + 1, last_status_code=status_code, last_error=error,
                status=status, next_attempt_at=None if status != DeliveryStatus.pending else next_attempt_at,
                delivered_at=now if delivered else None)
        .execution_options(**_NO_SYNC)
    ).rowcount
    if rows:
        session.add(WebhookAttempt(delivery_id=delivery_id, attempt_no=delivery.attempts + 1,
                                   status_code=status_code, error=error, duration_ms=duration_ms,
                                   created_at=now, address=address))
    session.commit()


def replay_delivery(session: Session, tenant_id: str, delivery_id: str, now: datetime) -> WebhookDelivery | None:
    """A delivered or failed delivery back to ``pending``, due ``now``: the same id (the
    ``webhook-id``) and payload, a new attempt, and a retry window counted from ``now``. One
    conditional update, so it cannot race the webhook worker, which only takes pending rows.
    None when the delivery is not the tenant's; ``DeliveryPending`` while it is still pending.
    The caller commits."""
    replayed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.tenant_id == tenant_id,
               WebhookDelivery.status.in_(REPLAYABLE))
        .values(status=DeliveryStatus.pending, next_attempt_at=now, replayed_at=now)
        .execution_options(**_NO_SYNC)
    ).rowcount
    delivery = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id,
                                                            WebhookDelivery.tenant_id == tenant_id)
                              .execution_options(populate_existing=True))
    if delivery is not None and not replayed:
        raise DeliveryPending(f"delivery_id: delivery {delivery_id!r} is pending (next attempt at "
                              f"{delivery.next_attempt_at:%Y-%m-%dT%H:%M:%SZ}); replay it once it is delivered or "
                              "failed", field="delivery_id")
    return delivery


def add_test_delivery(session: Session, tenant_id: str, url: str, now: datetime) -> WebhookDelivery:
    """A ``webhook.test`` ping to ``url``, sent and logged like any event. The caller commits."""
    return add_delivery(session, tenant_id, EVENT_WEBHOOK_TEST, url, {"message": TEST_MESSAGE}, now)


def _delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def lock_batch(session: Session, batch_id: str) -> Batch | None:
    # FOR NO KEY UPDATE: serializes completions of one batch without conflicting with the
    # KEY SHARE locks that inserting outbox rows (foreign key to the batch) takes.
    return session.scalar(select(Batch).where(Batch.id == batch_id).with_for_update(key_share=True)
                          .execution_options(populate_existing=True))


def complete_batch_if_done(session: Session, batch_id: str, now: datetime) -> bool:
    """``batch.completed`` when no job of the batch is left active; True when this call completed it."""
    batch = lock_batch(session, batch_id)
    if batch is None or batch.completed_at is not None:
        return False
    active = session.scalar(select(func.count()).select_from(Job)
                            .where(Job.batch_id == batch_id, Job.status.in_(list(ACTIVE_STATUSES))))
    if active:
        return False
    rows = session.execute(update(Batch).where(Batch.id == batch_id, Batch.completed_at.is_(None))
                           .values(completed_at=now).execution_options(**_NO_SYNC)).rowcount
    if not rows:
        return False
    log.info("batch %s completed", batch_id)
    if batch.webhook_url:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.position)
                               .execution_options(populate_existing=True)).all()
        add_delivery(session, batch.tenant_id, EVENT_BATCH_COMPLETED, batch.webhook_url,
                      batch_payload(batch, jobs, now), now, batch_id=batch_id)
    return True


def add_delivery(session: Session, tenant_id: str, event: str, url: str, data: dict[str, Any],
                  now: datetime, *, job_id: str | None = None, batch_id: str | None = None) -> WebhookDelivery:
    payload = {"type": event, "timestamp": now.isoformat(), "data": data}
    delivery = WebhookDelivery(id=_delivery_id(), tenant_id=tenant_id, event=event, job_id=job_id,
                               batch_id=batch_id, url=url, payload=payload,
                               status=DeliveryStatus.pending, attempts=0, next_attempt_at=now,
                               created_at=now)
    session.add(delivery)
    return delivery


def job_payload(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "batch_id": job.batch_id,
        "position": job.position,
        "task": job.task,
        "status": JobStatus(job.status).value,
        "output_key": job.output_key,
        "output_text": job.output_text,
        "think_text": job.think_text,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "model_seconds": job.model_seconds,
        "gpu_seconds": job.gpu_seconds,
        "metadata": job.meta,
        "dedupe": job.dedupe_state,
        "dedupe_of": job.dedupe_source,
        "quality": quality_summary(job.quality),
    }


def quality_summary(quality: dict[str, Any] | None) -> dict[str, Any] | None:
    """What an event and a job view say of the quality gate: the verdict, the result's score,
    the threshold and the number of attempts (the full record: ``GET /v1/jobs/{id}``'s ``quality``)."""
    if not quality:
        return None
    return {"gate": quality.get("gate"), "score": quality.get("score"), "threshold": quality.get("threshold"),
            "attempts": len(quality.get("attempts", []))}


def batch_payload(batch: Batch, jobs: Sequence[Job], now: datetime) -> dict[str, Any]:
    counts = {s.value: 0 for s in JobStatus}
    manifest = []
    for job in jobs:
        status = JobStatus(job.status).value
        counts[status] += 1
        manifest.append({"job_id": job.id, "position": job.position, "status": status,
                         "output_key": job.output_key, "error_code": job.error_code})
    return {"batch_id": batch.id, "completed_at": now.isoformat(), "counts": counts,
            "metadata": batch.meta, "jobs": manifest}
