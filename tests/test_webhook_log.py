"""The webhook delivery log (GET /v1/webhooks/deliveries[/{id}]), replays and test pings, on both
stacks: the API app on the real database, a real webhook worker process sending to the real
receiver, every request checked with Svix's independent Standard Webhooks verifier.

Covers: every attempt logged with its time, status code, latency, error and address; filters
and cursor pages; tenant isolation; replays (same ``webhook-id`` and body, a new attempt, 409
while pending, idempotent with a key); test pings checked like webhook URLs (form only) with
nothing stored on a 422.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from svix.webhooks import Webhook as SvixWebhook

from api.main import create_app
from tests.fixtures.contract import assert_event_matches_contract
from tests.fixtures.worker import Stack, free_port, wait_until
from worker import chunks, jobs, tenants
from worker.jobs import JobSpec
from worker.models import DeliveryStatus, WebhookDelivery, utcnow
from worker.dev.receiver import WebhookReceiver

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@dataclass
class Api:
    """The API app over a stack's settings, and two tenants with keys."""

    client: TestClient
    tenant_id: str
    secret: str
    key: str
    other_key: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def get(self, path: str, key: str | None = None, **params: Any) -> Any:
        return self.client.get(path, params=params, headers=self.auth(key))

    def ping(self, url: str, **headers: str) -> dict[str, Any]:
        r = self.client.post("/v1/webhooks/test", json={"url": url}, headers={**self.auth(), **headers})
        assert r.status_code == 202, r.text
        return r.json()

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        r = self.get(f"/v1/webhooks/deliveries/{delivery_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, delivery_id: str, status: str, attempts: int) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            body = self.delivery(delivery_id)
            return body if body["status"] == status and len(body["attempts"]) == attempts else None

        return wait_until(reached, 30, what=f"delivery {delivery_id} {status} after {attempts} attempt(s)")


@pytest.fixture
def api(stack: Stack) -> Iterator[Api]:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "acme")
        _, key = tenants.create_api_key(s, tenant.id, "tests")
        other = tenants.create_tenant(s, "globex")
        _, other_key = tenants.create_api_key(s, other.id, "tests")
    with TestClient(create_app(stack.settings)) as client:
        yield Api(client, tenant.id, tenant.webhook_secret, key, other_key)


def _finished_batch(stack: Stack, tenant_id: str, url: str) -> tuple[str, list[str]]:
    """A batch of two jobs driven to succeeded through the lease protocol: two job.succeeded
    deliveries and one batch.completed in the outbox."""
    with stack.session() as s:
        specs = [JobSpec(task="generate", prompt=f"scene {i}", params={"num_timesteps": 2, "seed": i},
                         width=32, height=32) for i in range(2)]
        batch, rows = jobs.submit(s, tenant_id, specs, batch=True, webhook_url=url, metadata={})
        chunk_id = chunks.form_chunk(s, [j.id for j in rows], utcnow())
        s.commit()
        for job in chunks.claim_chunk(s, chunk_id, "w1", 60):
            jobs.complete_job(s, job.id, "w1", output_key=f"results/{tenant_id}/{job.id}.png", model_seconds=0.1)
        return batch.id, [j.id for j in rows]


def _verify(secret: str, received: list[Any]) -> None:
    for item in received:
        SvixWebhook(secret).verify(item.body, item.headers)  # raises on a bad signature


def test_a_test_ping_is_signed_sent_by_the_webhook_worker_and_logged(
        stack: Stack, api: Api, receiver: WebhookReceiver) -> None:
    queued = api.ping(receiver.url)
    assert queued["event"] == "webhook.test" and queued["status"] == "pending" and queued["attempts"] == []
    assert queued["id"].startswith("msg_") and queued["url"] == receiver.url
    assert queued["payload"]["type"] == "webhook.test" and queued["payload"]["data"]["message"]
    stack.start("webhooks")
    got = receiver.wait_for("webhook.test", timeout_s=30)
    _verify(api.secret, got)
    assert got[0].headers["webhook-id"] == queued["id"]
    assert got[0].json()["data"] == queued["payload"]["data"]
    assert_event_matches_contract(got[0].json())
    done = api.wait_status(queued["id"], "delivered", 1)
    [attempt] = done["attempts"]
    assert (attempt["attempt"], attempt["status_code"], attempt["error"]) == (1, 200, None)
    assert attempt["address"] == "127.0.0.1" and attempt["latency_ms"] >= 0
    assert datetime.fromisoformat(attempt["at"]) >= datetime.fromisoformat(done["created_at"])
    assert done["delivered_at"] is not None and done["next_attempt_at"] is None


def test_every_attempt_is_logged_with_its_status_code_latency_and_error(
        stack: Stack, api: Api, receiver: WebhookReceiver) -> None:
    receiver.fail_next(2, status=503)
    flaky = api.ping(receiver.url)
    closed = api.ping(f"http://127.0.0.1:{free_port()}/hooks")  # nothing listens there
    stack.start("webhooks")
    stack.start("reconciler")  # nudges the webhook worker when a retry is due
    done = api.wait_status(flaky["id"], "delivered", 3)
    assert [(a["attempt"], a["status_code"], a["error"]) for a in done["attempts"]] == [
        (1, 503, "HTTP 503"), (2, 503, "HTTP 503"), (3, 200, None)]
    assert [a["at"] for a in done["attempts"]] == sorted(a["at"] for a in done["attempts"])
    assert all(a["latency_ms"] >= 0 and a["address"] == "127.0.0.1" for a in done["attempts"])
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    _verify(api.secret, receiver.received)

    def refused() -> dict[str, Any] | None:
        body = api.delivery(closed["id"])
        return body if body["attempts"] else None

    first = wait_until(refused, 30, what="an attempt at the closed port")["attempts"][0]
    assert first["status_code"] is None and first["error"].startswith("ConnectError: ")
    assert first["address"] == "127.0.0.1"


def test_deliveries_filter_by_event_status_time_job_and_batch_and_page_newest_first(
        stack: Stack, api: Api) -> None:
    pings = [api.ping(f"https://hooks.example.com/bagel/{i}")["id"] for i in range(3)]
    batch_id, job_ids = _finished_batch(stack, api.tenant_id, "https://hooks.example.com/bagel")
    with stack.session() as s:
        rows = {d.id: d for d in s.scalars(select(WebhookDelivery)).all()}
        events = {d.event: d.id for d in rows.values() if d.event != "webhook.test"}
        job_rows = [d.id for d in rows.values() if d.event == "job.succeeded"]
        # A timeline: the pings at T0+1..3 min, the job events at T0, the batch event at T0-1 min.
        for i, ping in enumerate(pings):
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == ping)
                      .values(created_at=T0 + timedelta(minutes=i + 1)))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(job_rows)).values(created_at=T0))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == events["batch.completed"])
                  .values(created_at=T0 - timedelta(minutes=1), status=DeliveryStatus.failed, next_attempt_at=None))
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == pings[0])
                  .values(status=DeliveryStatus.delivered, next_attempt_at=None))
        s.commit()

    def ids(**params: Any) -> list[str]:
        r = api.get("/v1/webhooks/deliveries", **params)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()["data"]]

    newest_first = [*reversed(pings), *sorted(job_rows, reverse=True), events["batch.completed"]]
    assert ids() == newest_first
    assert ids(event="webhook.test") == list(reversed(pings))
    assert ids(event="batch.completed") == [events["batch.completed"]]
    assert ids(status="failed") == [events["batch.completed"]]
    assert ids(status="delivered") == [pings[0]]
    assert ids(status="pending", event="job.succeeded") == sorted(job_rows, reverse=True)
    assert ids(job_id=job_ids[0]) == [d for d in job_rows if rows[d].job_id == job_ids[0]]
    assert ids(batch_id=batch_id) == [*sorted(job_rows, reverse=True), events["batch.completed"]]
    assert ids(created_after=T0.isoformat(), created_before=(T0 + timedelta(minutes=3)).isoformat()) == \
        [pings[1], pings[0]]
    assert ids(created_before="2026-03-01T09:00:00") == [events["batch.completed"]]  # no zone: UTC

    paged, cursor, pages = [], None, 0
    while True:
        r = api.get("/v1/webhooks/deliveries", limit=2, **({"cursor": cursor} if cursor else {}))
        body = r.json()
        assert len(body["data"]) <= 2
        paged += [d["id"] for d in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert paged == newest_first and pages == 3
    listed = api.get("/v1/webhooks/deliveries", event="webhook.test").json()["data"][0]
    assert listed["payload"] is None and listed["attempts"] == []  # the payload is on the single read


def test_the_log_is_per_tenant_and_bad_queries_are_422s_naming_the_parameter(stack: Stack, api: Api) -> None:
    mine = api.ping("https://hooks.example.com/bagel")["id"]
    assert api.get("/v1/webhooks/deliveries", key=api.other_key).json() == {"data": [], "next_cursor": None}
    for r in (api.get(f"/v1/webhooks/deliveries/{mine}", key=api.other_key),
              api.client.post(f"/v1/webhooks/deliveries/{mine}/replay", headers=api.auth(api.other_key)),
              api.get("/v1/webhooks/deliveries/msg_nope")):
        assert r.status_code == 404 and r.json()["error"]["field"] == "delivery_id", r.text
    for params, field, text in [
        ({"event": "job.exploded"}, "event", "event: Input should be 'job.succeeded', 'job.failed'"),
        ({"status": "lost"}, "status", "status: Input should be 'pending', 'delivered' or 'failed'"),
        ({"limit": 0}, "limit", "limit: Input should be greater than or equal to 1 (limit: >= 1)"),
        ({"limit": 201}, "limit", "(limit: <= 200)"),
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor", "cursor: 'bm90IGEgY3Vyc29y' is not a cursor this API returned"),
        ({"created_after": "yesterday"}, "created_after", "created_after: Input should be a valid datetime"),
    ]:
        r = api.get("/v1/webhooks/deliveries", **params)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == field and text in r.json()["error"]["message"]
    assert api.client.get("/v1/webhooks/deliveries").status_code == 401


def test_a_replay_sends_the_same_webhook_id_and_body_as_a_new_attempt(
        stack: Stack, api: Api, receiver: WebhookReceiver) -> None:
    receiver.fail_next(1, status=500)
    queued = api.ping(receiver.url)
    r = api.client.post(f"/v1/webhooks/deliveries/{queued['id']}/replay", headers=api.auth())
    assert r.status_code == 409, r.text  # still pending: its first attempt is already planned
    assert r.json()["error"]["code"] == "delivery_pending" and r.json()["error"]["field"] == "delivery_id"
    # A retry window of 0 s: the 500 fails the delivery for good (dead) at once.
    stack.start("webhooks", extra_env={"BAGEL_JOBS_WEBHOOK_RETRY_WINDOW_S": "0"})
    dead = api.wait_status(queued["id"], "failed", 1)
    assert dead["attempts"][0]["status_code"] == 500

    replayed = api.client.post(f"/v1/webhooks/deliveries/{queued['id']}/replay",
                               headers={**api.auth(), "Idempotency-Key": "replay-1"})
    assert replayed.status_code == 202, replayed.text
    assert replayed.json()["status"] == "pending" and replayed.json()["replayed_at"] is not None
    again = api.client.post(f"/v1/webhooks/deliveries/{queued['id']}/replay",
                            headers={**api.auth(), "Idempotency-Key": "replay-1"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == replayed.json()
    delivered = api.wait_status(queued["id"], "delivered", 2)
    assert [(a["attempt"], a["status_code"]) for a in delivered["attempts"]] == [(1, 500), (2, 200)]

    # A delivered one can be replayed too: a third attempt, the same id and body.
    assert api.client.post(f"/v1/webhooks/deliveries/{queued['id']}/replay", headers=api.auth()).status_code == 202
    api.wait_status(queued["id"], "delivered", 3)
    sent = [r for r in receiver.received if r.event == "webhook.test"]
    assert [r.status for r in sent] == [500, 200, 200]
    assert {r.headers["webhook-id"] for r in sent} == {queued["id"]}
    assert len({r.body for r in sent}) == 1
    _verify(api.secret, sent)


def test_test_ping_urls_are_checked_by_form_only_and_a_refusal_stores_nothing(api_stack) -> None:
    strict = api_stack.settings.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(strict)) as client:
        def post(body: dict[str, Any]) -> Any:
            return client.post("/v1/webhooks/test", json=body, headers=api_stack.auth())

        before = api_stack.row_counts()
        for body, message in [
            ({"url": "ftp://hooks.example.com/x"}, "url: scheme 'ftp' is not allowed (use https or http)"),
            ({"url": "http://127.0.0.1:9000/hooks"},
             "url: host '127.0.0.1' is the non-public address 127.0.0.1 (private targets are not allowed)"),
            ({"url": "http://[::ffff:10.0.0.1]/hooks"}, "is the non-public address ::ffff:a00:1 (IPv4 10.0.0.1)"),
            ({"url": "http://[2002:7f00:1::1]/hooks"}, "is the non-public address 2002:7f00:1::1 (IPv4 127.0.0.1)"),
            ({"url": "http://100.64.0.7/hooks"}, "is the non-public address 100.64.0.7"),
            ({"url": "http://localhost:8080/hooks"}, "url: host 'localhost' is a loopback name"),
            ({"url": "https://u:p@hooks.example.com/"}, "url: credentials in the URL are not allowed"),
            ({"url": "https://hooks.example.com/" + "x" * 2100}, "url: String should have at most 2048 characters"),
            ({}, "url: Field required"),
        ]:
            r = post(body)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == "url" and message in r.json()["error"]["message"], r.text
        assert api_stack.row_counts() == before
        # Only the form is checked when asked: a name is resolved at delivery, so one that does
        # not resolve here (the README's example) is accepted, for a ping and for a job.
        r = post({"url": "https://hooks.example.com/bagel"})
        assert r.status_code == 202 and r.json()["url"] == "https://hooks.example.com/bagel", r.text
        r = client.post("/v1/jobs", headers=api_stack.auth(), json={
            "task": "generate", "prompt": "x", "width": 32, "height": 32,
            "webhook_url": "https://hooks.example.com/bagel"})
        assert r.status_code == 202 and r.json()["webhook_url"] == "https://hooks.example.com/bagel", r.text
    with api_stack.session() as s:
        assert s.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
