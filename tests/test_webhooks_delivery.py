"""Webhook delivery from the outbox to a real HTTP receiver, through a real webhook worker
process (and in-process where only the delivery function is under test).

Every received request is verified with Svix's independent Standard Webhooks verifier.
"""

from __future__ import annotations

from sqlalchemy import select
from svix.webhooks import Webhook as SvixWebhook

from tests.fixtures.contract import assert_event_matches_contract
from tests.fixtures.worker import Stack, free_port, wait_until
from worker import chunks, dispatch, jobs, tenants
from worker.jobs import JobSpec
from worker.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, utcnow
from worker.dev.receiver import WebhookReceiver
from worker.storage import make_store
from worker.webhooks import deliver_due


def _finished_batch(stack: Stack, url: str, n: int = 2, fail_last: bool = False) -> tuple[str, str, list[str]]:
    """A tenant and a batch of ``n`` jobs driven to done through the lease protocol."""
    with stack.session() as s:
        tenant = tenants.create_tenant(s, f"t-{url[-12:]}-{n}-{fail_last}")
        specs = [JobSpec(task="generate", prompt=f"scene {i}", params={"num_timesteps": 2, "seed": i},
                         width=32, height=32) for i in range(n)]
        batch, rows = jobs.submit(s, tenant.id, specs, batch=True, webhook_url=url, metadata={"k": 1})
        chunk_id = chunks.form_chunk(s, [j.id for j in rows], utcnow())  # what the dispatcher does
        s.commit()
        claimed = chunks.claim_chunk(s, chunk_id, "w1", 60)
        for i, job in enumerate(claimed):
            if fail_last and i == len(claimed) - 1:
                jobs.fail_job(s, job.id, "w1", "invalid_input", "prompt: bad")
            else:
                jobs.complete_job(s, job.id, "w1", output_key=f"results/{tenant.id}/{job.id}.png", model_seconds=0.1)
        return tenant.webhook_secret, batch.id, [j.id for j in rows]


def _deliveries(stack: Stack) -> list[WebhookDelivery]:
    with stack.session() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)).all())


def test_webhook_worker_delivers_signed_job_and_batch_events(stack: Stack, receiver: WebhookReceiver) -> None:
    secret, batch_id, job_ids = _finished_batch(stack, receiver.url, n=3, fail_last=True)
    stack.start("webhooks")
    dispatch.nudge_webhooks(stack.settings)
    got = receiver.wait_for("batch.completed", timeout_s=30)
    receiver.wait_for("job.succeeded", count=2, timeout_s=10)
    receiver.wait_for("job.failed", count=1, timeout_s=10)
    for item in receiver.accepted():
        SvixWebhook(secret).verify(item.body, item.headers)  # raises on a bad signature
        assert item.headers["webhook-id"].startswith("msg_")
        assert_event_matches_contract(item.json())  # the OpenAPI document's webhooks section
    manifest = got[0].json()["data"]
    assert manifest["batch_id"] == batch_id
    assert [j["job_id"] for j in manifest["jobs"]] == job_ids
    assert [j["status"] for j in manifest["jobs"]] == ["succeeded", "succeeded", "failed"]
    assert manifest["jobs"][0]["output_url"].startswith(("http://", "https://"))
    assert "output_url" not in manifest["jobs"][2]
    wait_until(lambda: all(d.status == DeliveryStatus.delivered for d in _deliveries(stack)), 10,
               what="all deliveries marked delivered")
    assert len(_deliveries(stack)) == 4


def test_receiver_errors_are_retried_until_delivered_once_with_a_stable_id(
        stack: Stack, receiver: WebhookReceiver) -> None:
    receiver.fail_next(4, status=503)  # both events (job, batch) fail twice
    secret, batch_id, _ = _finished_batch(stack, receiver.url, n=1)
    stack.start("webhooks")
    stack.start("reconciler")  # nudges the webhook worker when a retry is due
    got = receiver.wait_for("batch.completed", timeout_s=30)
    assert len(got) == 1
    attempts = [r for r in receiver.received if r.event == "batch.completed"]
    assert [r.status for r in attempts] == [503, 503, 200]
    assert len({r.headers["webhook-id"] for r in attempts}) == 1
    SvixWebhook(secret).verify(got[0].body, got[0].headers)
    wait_until(lambda: all(d.status == DeliveryStatus.delivered for d in _deliveries(stack)), 10,
               what="deliveries marked delivered")
    with stack.session() as s:
        delivery = s.scalar(select(WebhookDelivery).where(WebhookDelivery.event == "batch.completed"))
        tries = s.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery.id)
                          .order_by(WebhookAttempt.attempt_no)).all()
    assert delivery.status == DeliveryStatus.delivered and delivery.attempts == 3
    assert [(t.attempt_no, t.status_code) for t in tries] == [(1, 503), (2, 503), (3, 200)]


def test_receiver_down_then_up_gets_each_event_once(stack: Stack) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    secret, _, _ = _finished_batch(stack, url, n=1)
    store = make_store(stack.settings)
    assert deliver_due(stack.settings, stack.session, store) == 0  # connection refused
    with stack.session() as s:
        s.execute(WebhookDelivery.__table__.update().values(next_attempt_at=WebhookDelivery.created_at))
        s.commit()
    with WebhookReceiver(port=port) as rx:
        assert deliver_due(stack.settings, stack.session, store) == 2
        assert deliver_due(stack.settings, stack.session, store) == 0  # nothing left, no duplicate
        assert sorted(r.event for r in rx.accepted()) == ["batch.completed", "job.succeeded"]
        for item in rx.accepted():
            SvixWebhook(secret).verify(item.body, item.headers)
    with stack.session() as s:
        errors = s.scalars(select(WebhookAttempt.error).where(WebhookAttempt.status_code.is_(None))).all()
    assert len(errors) == 2 and all("Connect" in e for e in errors)


def test_delivery_gives_up_after_the_retry_window(stack: Stack, receiver: WebhookReceiver) -> None:
    receiver.fail_next(100, status=500)
    _finished_batch(stack, receiver.url, n=1)
    settings = stack.settings.model_copy(update={"webhook_retry_window_s": 0})
    deliver_due(settings, stack.session, make_store(settings))
    rows = _deliveries(stack)
    assert {d.status for d in rows} == {DeliveryStatus.failed}
    assert all(d.last_status_code == 500 and d.last_error == "HTTP 500" for d in rows)


def test_private_target_is_refused_at_delivery_when_not_allowed(stack: Stack, receiver: WebhookReceiver) -> None:
    _finished_batch(stack, receiver.url, n=1)
    settings = stack.settings.model_copy(update={"webhook_allow_private": False})
    assert deliver_due(settings, stack.session, make_store(settings)) == 0
    assert receiver.received == []
    rows = _deliveries(stack)
    assert {d.status for d in rows} == {DeliveryStatus.failed}
    assert all("private" in (d.last_error or "") for d in rows)
