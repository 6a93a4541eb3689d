"""``bagel-jobs key revoke`` and ``bagel-jobs tenant rotate-secret`` as a user runs them (real
processes, both stacks): a revoked key gets a 401 from a running API on its next request, and
the next webhook a running webhook worker sends is signed with the rotated secret only."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from svix.webhooks import Webhook as SvixWebhook
from svix.webhooks import WebhookVerificationError

from tests.fixtures.worker import ROOT, Stack
from worker import tenants
from worker.dev.receiver import WebhookReceiver


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=stack.env, capture_output=True,
                          text=True, timeout=120)


def test_a_revoked_key_is_refused_by_the_running_api_on_its_next_request(stack: Stack) -> None:
    stack.start("api")
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "acme")
        by_id, first = tenants.create_api_key(s, tenant.id, "ci")
        _, second = tenants.create_api_key(s, tenant.id, "laptop")
        _, third = tenants.create_api_key(s, tenant.id, "spare")

    def status(key: str) -> int:
        r = httpx.get(f"{stack.api_url()}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        return r.status_code

    assert [status(k) for k in (first, second, third)] == [200, 200, 200]
    done = _cli(stack, "key", "revoke", by_id.id)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["key_id"], shown["tenant_id"], shown["prefix"]) == (by_id.id, tenant.id, first[:10])
    assert shown["revoked_at"] and "revoked: the API refuses it from the next request on" in done.stderr
    refused = httpx.get(f"{stack.api_url()}/v1/jobs", headers={"Authorization": f"Bearer {first}"}, timeout=30)
    assert refused.status_code == 401 and "unknown or revoked" in refused.json()["error"]["message"]
    assert [status(second), status(third)] == [200, 200]  # the tenant's other keys still work

    by_prefix = _cli(stack, "key", "revoke", second[:10])
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert [status(second), status(third)] == [401, 200]
    again = _cli(stack, "key", "revoke", second[:10])
    assert again.returncode == 0
    assert json.loads(again.stdout)["revoked_at"] == json.loads(by_prefix.stdout)["revoked_at"]
    assert "was revoked already" in again.stderr
    missing = _cli(stack, "key", "revoke", "bj_nothing")
    assert missing.returncode == 1 and "key: no API key with id or prefix 'bj_nothing'" in missing.stderr
    assert status(third) == 200


def test_a_rotated_secret_signs_the_next_webhook_and_the_old_one_no_longer_verifies(
        stack: Stack, receiver: WebhookReceiver) -> None:
    stack.start("api")
    stack.start("webhooks")
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "acme")
        _, key = tenants.create_api_key(s, tenant.id)
    old = tenant.webhook_secret

    def ping() -> tuple[bytes, dict[str, str]]:
        r = httpx.post(f"{stack.api_url()}/v1/webhooks/test", json={"url": receiver.url},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 202, r.text
        got = [item for item in receiver.wait_for("webhook.test", count=len(receiver.received) + 1, timeout_s=30)
               if item.headers["webhook-id"] == r.json()["id"]]
        return got[0].body, got[0].headers

    before = ping()
    SvixWebhook(old).verify(*before)
    done = _cli(stack, "tenant", "rotate-secret", "acme")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["tenant_id"], shown["name"]) == (tenant.id, "acme")
    new = shown["webhook_secret"]
    assert new.startswith("whsec_") and new != old and "rotated" in done.stderr and new not in done.stderr
    after = ping()  # the same running webhook worker signs it
    SvixWebhook(new).verify(*after)
    with pytest.raises(WebhookVerificationError):
        SvixWebhook(old).verify(*after)
