"""``/v1/webhooks``: the tenant's webhook delivery log (every attempt with its time, status code,
latency, error and address), replaying a delivery, and a signed test ping.

Replays and pings only write the outbox (``worker.outbox``); the webhook worker sends them as it
sends every event, so no request to a client's URL leaves the API process. The route nudges the
worker through the broker; when the broker is down, the reconciler's next tick does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from api import idempotency
from api.contract import (ACT_ON, AFTER, BEFORE, CURSOR, ID_PATTERN, READ, READ_ONE, WITH_BODY, IdempotencyKey, Time,
                          errors, id_path)
from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import DeliveryAttemptOut, DeliveryList, DeliveryOut, Event, WebhookTestIn
from worker import dispatch, outbox, queries, webhook_targets
from worker.errors import BrokerUnavailable, NotFound
from worker.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, utcnow
from worker.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
TEST_ROUTE = "POST /v1/webhooks/test"
REPLAY_ROUTE = "POST /v1/webhooks/deliveries/{delivery_id}/replay"
MAX_LIST_LIMIT = 200


DELIVERY_ID = id_path("delivery", "msg_2f1e0d")
ID_FILTER = {"min_length": 1, "max_length": 64, "json_schema_extra": {"pattern": ID_PATTERN}}


def _not_found(delivery_id: str) -> NotFound:
    return NotFound(f"delivery_id: delivery {delivery_id!r} not found", field="delivery_id")


def delivery_out(delivery: WebhookDelivery, attempts: Sequence[WebhookAttempt], *,
                 with_payload: bool = False) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id, event=delivery.event, url=delivery.url, status=DeliveryStatus(delivery.status),
        job_id=delivery.job_id, batch_id=delivery.batch_id, created_at=delivery.created_at,
        next_attempt_at=delivery.next_attempt_at, delivered_at=delivery.delivered_at,
        replayed_at=delivery.replayed_at,
        attempts=[DeliveryAttemptOut(attempt=a.attempt_no, at=a.created_at, status_code=a.status_code,
                                     latency_ms=round(a.duration_ms, 3), error=a.error, address=a.address)
                  for a in attempts],
        payload=dict(delivery.payload) if with_payload else None,
    )


def _nudge(settings: Settings) -> None:
    try:
        dispatch.nudge_webhooks(settings)
    except BrokerUnavailable as exc:
        log.warning("webhook worker not nudged (the reconciler will): %s", exc)


@router.get("/deliveries", response_model=DeliveryList, responses=errors(*READ), summary="List webhook deliveries")
def list_deliveries(tenant: TenantDep, session: SessionDep,
                    event: Annotated[Event | None, Query(description="only this event's deliveries")] = None,
                    status: Annotated[DeliveryStatus | None, Query(description="only deliveries in this "
                                                                   "status")] = None,
                    job_id: Annotated[str | None, Query(description="only this job's", **ID_FILTER)] = None,
                    batch_id: Annotated[str | None, Query(description="only this batch's", **ID_FILTER)] = None,
                    created_after: Annotated[Time | None, AFTER] = None,
                    created_before: Annotated[Time | None, BEFORE] = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT, description="deliveries per page")] = 50,
                    cursor: Annotated[str | None, CURSOR] = None) -> DeliveryList:
    """The tenant's webhook deliveries, newest first, each with every attempt (time, status
    code, latency, error, address); the time bounds (on when the event happened) are exclusive."""
    page = queries.list_deliveries(session, tenant.id, limit=limit, cursor=cursor, event=event, status=status,
                                   job_id=job_id, batch_id=batch_id, created_after=created_after,
                                   created_before=created_before)
    attempts = queries.delivery_attempts(session, [d.id for d in page.rows])
    return DeliveryList(data=[delivery_out(d, attempts[d.id]) for d in page.rows], next_cursor=page.next_cursor)


@router.get("/deliveries/{delivery_id}", response_model=DeliveryOut, responses=errors(*READ_ONE),
            summary="Get a webhook delivery")
def get_delivery(delivery_id: Annotated[str, DELIVERY_ID], tenant: TenantDep, session: SessionDep) -> DeliveryOut:
    """One delivery with its payload and every attempt."""
    delivery = queries.get_delivery(session, tenant.id, delivery_id)
    if delivery is None:
        raise _not_found(delivery_id)
    return delivery_out(delivery, queries.delivery_attempts(session, [delivery.id])[delivery.id], with_payload=True)


@router.post("/deliveries/{delivery_id}/replay", status_code=202, response_model=DeliveryOut,
             responses=errors(*ACT_ON), summary="Replay a webhook delivery")
def replay_delivery(delivery_id: Annotated[str, DELIVERY_ID], tenant: TenantDep, session: SessionDep,
                    settings: SettingsDep, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Send a delivered or failed delivery again: the same ``webhook-id`` and payload, a fresh
    signature and timestamp, one more attempt (retried as usual). 409 while it is pending."""
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint({"delivery_id": delivery_id})
    if (previous := idempotency.replay(session, tenant.id, key, REPLAY_ROUTE, digest)) is not None:
        return previous
    delivery = outbox.replay_delivery(session, tenant.id, delivery_id, utcnow())
    if delivery is None:
        raise _not_found(delivery_id)
    attempts = queries.delivery_attempts(session, [delivery.id])[delivery.id]
    out = delivery_out(delivery, attempts, with_payload=True).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, REPLAY_ROUTE, digest, 202, out)) is not None:
        return winner
    _nudge(settings)
    return JSONResponse(out, status_code=202)


@router.post("/test", status_code=202, response_model=DeliveryOut, responses=errors(*WITH_BODY),
             summary="Send a test webhook")
def send_test_webhook(body: WebhookTestIn, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
                      idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Queue a signed ``webhook.test`` ping to ``url``; it appears in the delivery log."""
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint(body.model_dump(mode="json"))
    if (previous := idempotency.replay(session, tenant.id, key, TEST_ROUTE, digest)) is not None:
        return previous
    webhook_targets.check_webhook_url(body.url, allow_private=settings.webhook_allow_private, field="url")
    delivery = outbox.add_test_delivery(session, tenant.id, body.url, utcnow())
    out = delivery_out(delivery, [], with_payload=True).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, TEST_ROUTE, digest, 202, out)) is not None:
        return winner
    _nudge(settings)
    return JSONResponse(out, status_code=202)
