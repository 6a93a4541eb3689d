"""Webhook signatures, backoff and the event envelope (no services needed).

Our signer is checked against two independent implementations of the Standard Webhooks spec
(``standardwebhooks`` and Svix's verifier), and our own verifier (used by the demo) against
tampering, stale timestamps and key rotation.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time

import pytest
import standardwebhooks
from svix.webhooks import Webhook as SvixWebhook
from svix.webhooks import WebhookVerificationError

from worker import signing
from worker.webhooks import envelope, next_delay_s


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def test_signature_verifies_with_standardwebhooks_and_svix() -> None:
    secret = _secret()
    body = json.dumps({"type": "job.succeeded", "data": {"job_id": "j1"}}).encode()
    headers = signing.headers(secret, "msg_abc", body)
    assert standardwebhooks.Webhook(secret).verify(body, headers)["data"]["job_id"] == "j1"
    SvixWebhook(secret).verify(body, headers)  # raises on mismatch


def test_signature_matches_the_spec_formula() -> None:
    # Spec example layout: base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")) prefixed "v1,".
    import hashlib
    import hmac

    key = b"0123456789abcdef0123456789abcdef"
    secret = "whsec_" + base64.b64encode(key).decode()
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
    assert signing.sign(secret, "msg_1", 1700000000, b"{}") == f"v1,{expected}"


def test_independent_verifiers_reject_a_tampered_body() -> None:
    secret = _secret()
    body = b'{"type":"job.failed"}'
    headers = signing.headers(secret, "msg_x", body)
    with pytest.raises(WebhookVerificationError):
        SvixWebhook(secret).verify(b'{"type":"job.succeeded"}', headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(_secret()).verify(body, headers)


def test_own_verifier_accepts_valid_and_rotated_signatures() -> None:
    secret, old = _secret(), _secret()
    body = b'{"a":1}'
    headers = signing.headers(secret, "msg_r", body)
    assert signing.verify(secret, body, headers) == "msg_r"
    ts = int(headers["webhook-timestamp"])
    rotated = dict(headers, **{"webhook-signature": f"{signing.sign(old, 'msg_r', ts, body)} "
                                                    f"{headers['webhook-signature']}"})
    assert signing.verify(secret, body, rotated) == "msg_r"


@pytest.mark.parametrize(("change", "message"), [
    ({"body": b'{"a":2}'}, "no v1 signature matches"),
    ({"timestamp": int(time.time()) - 3600}, "more than 300 s from now"),
    ({"drop": "webhook-id"}, "webhook-id is missing"),
])
def test_own_verifier_rejects_tampering_stale_and_missing(change: dict, message: str) -> None:
    secret = _secret()
    body = b'{"a":1}'
    headers = signing.headers(secret, "msg_t", body, timestamp=change.get("timestamp"))
    headers.pop(change.get("drop", "none"), None)
    with pytest.raises(signing.SignatureError, match=message):
        signing.verify(secret, change.get("body", body), headers)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    delays = [next_delay_s(1.0, n, rng) for n in range(1, 8)]
    for n, d in enumerate(delays, start=1):
        cap = 2.0 ** (n - 1)
        assert cap / 2 <= d <= cap
    assert next_delay_s(10.0, 40, rng) <= 3600.0


def test_envelope_adds_fresh_urls_next_to_output_keys() -> None:
    from datetime import UTC, datetime

    payload = {"batch_id": "b", "jobs": [{"job_id": "j1", "output_key": "results/t/j1.png"},
                                         {"job_id": "j2", "output_key": None}]}
    body = json.loads(envelope("batch.completed", datetime(2026, 1, 2, tzinfo=UTC), payload,
                               lambda key: f"https://dl/{key}"))
    assert body["type"] == "batch.completed"
    assert body["timestamp"] == "2026-01-02T00:00:00Z"
    assert body["data"]["jobs"][0]["output_url"] == "https://dl/results/t/j1.png"
    assert "output_url" not in body["data"]["jobs"][1]


def test_envelope_keeps_an_outbox_envelope_as_is() -> None:
    from datetime import UTC, datetime

    payload = {"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00+00:00",
               "data": {"job_id": "j", "output_key": "results/t/j.png"}}
    body = json.loads(envelope("job.succeeded", datetime(2026, 1, 2, tzinfo=UTC), payload, lambda k: "u:" + k))
    assert body == {"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00+00:00",
                    "data": {"job_id": "j", "output_key": "results/t/j.png", "output_url": "u:results/t/j.png"}}
