"""Webhook URL checks at delivery, against a real DNS server: each attempt resolves the host once
(at the server ``webhook_dns_server`` names, here a dnslib server on a loopback UDP port whose
answers the test scripts), checks every answer, and connects to a checked address only.

Covers: submission checks the form only (no DNS query); a name that points at loopback at
delivery is refused there, for good, and the receiver listening on loopback never gets a
request; a name whose answer turns from public to loopback between attempts (DNS rebinding)
is caught on the attempt that sees loopback, and the earlier attempt went to the public
address it checked, not to a second lookup's answer; with private targets allowed, a delivery
by name reaches the real receiver through the checked address with the name as ``Host``; over
https the name is the TLS server name and the certificate is verified against it.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from fastapi.testclient import TestClient
from svix.webhooks import Webhook as SvixWebhook

from api.main import create_app
from tests.fixtures.worker import Stack, wait_until
from worker import tenants
from worker.dev.receiver import WebhookReceiver

PUBLIC = "93.184.215.14"  # a globally routable address; nothing the tests run listens there
REFUSED = "address_not_allowed: {name} resolved to 127.0.0.1 (private targets are not allowed)"


class ScriptedDns(BaseResolver):
    """Answers A queries for scripted names: the n-th query of a name gets the n-th answer of
    its script (the last one from then on), with TTL 0; AAAA queries get no answer, unknown
    names NXDOMAIN. Every query is recorded as (name, type)."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[str]] = {}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name, qtype = str(request.q.qname).rstrip("."), QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((name, qtype))
            if name not in self.scripts:
                reply.header.rcode = RCODE.NXDOMAIN
            elif qtype == "A":
                script = self.scripts[name]
                asked = sum(1 for q in self.queries if q == (name, "A"))
                reply.add_answer(RR(name, QTYPE.A, rdata=A(script[min(asked, len(script)) - 1]), ttl=0))
        return reply

    def a_queries(self, name: str) -> int:
        with self._lock:
            return sum(1 for q in self.queries if q == (name, "A"))


@dataclass
class Dns:
    resolver: ScriptedDns
    server: str  # host:port, the webhook_dns_server setting


@pytest.fixture
def dns() -> Iterator[Dns]:
    resolver = ScriptedDns()
    quiet = DNSLogger(log="-request,-reply,-truncated,-error", prefix=False)
    server = DNSServer(resolver, address="127.0.0.1", port=0, logger=quiet)
    server.start_thread()
    try:
        yield Dns(resolver, f"127.0.0.1:{server.server.server_address[1]}")
    finally:
        server.stop()
        server.server.server_close()


@dataclass
class Tenant:
    id: str
    secret: str
    key: str

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def tenant(stack: Stack) -> Tenant:
    with stack.session() as s:
        row = tenants.create_tenant(s, "acme")
        _, key = tenants.create_api_key(s, row.id, "tests")
    return Tenant(row.id, row.webhook_secret, key)


def _ping(client: TestClient, tenant: Tenant, url: str) -> str:
    r = client.post("/v1/webhooks/test", json={"url": url}, headers=tenant.auth())
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _delivery(client: TestClient, tenant: Tenant, delivery_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/webhooks/deliveries/{delivery_id}", headers=tenant.auth())
    assert r.status_code == 200, r.text
    return r.json()


def _wait_attempts(client: TestClient, tenant: Tenant, delivery_id: str, n: int, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = _delivery(client, tenant, delivery_id)
        return body if len(body["attempts"]) >= n and body["status"] == status else None

    return wait_until(reached, 30, what=f"{n} attempt(s) of {delivery_id}, {status}")


def _strict_worker_env(dns: Dns) -> dict[str, str]:
    return {"BAGEL_JOBS_WEBHOOK_ALLOW_PRIVATE": "false", "BAGEL_JOBS_WEBHOOK_DNS_SERVER": dns.server}


def test_a_name_pointing_at_loopback_is_accepted_at_submit_and_refused_at_delivery(
        stack: Stack, tenant: Tenant, dns: Dns, receiver: WebhookReceiver) -> None:
    name = "hooks.rebind.test"
    dns.resolver.scripts[name] = ["127.0.0.1"]
    url = f"http://{name}:{receiver.url.rsplit(':', 1)[1]}"
    strict = stack.settings.model_copy(update={"webhook_allow_private": False, "webhook_dns_server": dns.server})
    with TestClient(create_app(strict)) as client:
        job = client.post("/v1/jobs", headers=tenant.auth(), json={
            "task": "generate", "prompt": "x", "width": 32, "height": 32, "webhook_url": url})
        assert job.status_code == 202, job.text
        ping = _ping(client, tenant, url)
        assert dns.resolver.queries == []  # submission checks the form only
        stack.start("webhooks", extra_env=_strict_worker_env(dns))
        done = _wait_attempts(client, tenant, ping, 1, "failed")
    [attempt] = done["attempts"]  # refused for good: no retry
    assert attempt["error"] == REFUSED.format(name=name)
    assert (attempt["status_code"], attempt["address"]) == (None, None)
    assert dns.resolver.a_queries(name) == 1
    assert receiver.received == []


def test_an_answer_turning_to_loopback_between_attempts_never_reaches_loopback(
        stack: Stack, tenant: Tenant, dns: Dns, receiver: WebhookReceiver) -> None:
    """A zero-TTL name answering public to the first query and loopback after: a sender that
    checked one answer and connected by a second lookup would have posted to the receiver."""
    name = "flip.rebind.test"
    dns.resolver.scripts[name] = [PUBLIC, "127.0.0.1"]
    url = f"http://{name}:{receiver.url.rsplit(':', 1)[1]}"
    strict = stack.settings.model_copy(update={"webhook_allow_private": False, "webhook_dns_server": dns.server})
    with TestClient(create_app(strict)) as client:
        ping = _ping(client, tenant, url)
        stack.start("webhooks", extra_env=_strict_worker_env(dns))
        stack.start("reconciler")  # nudges the webhook worker when the retry is due
        done = _wait_attempts(client, tenant, ping, 2, "failed")
    first, second = done["attempts"]
    assert first["address"] == PUBLIC and first["status_code"] is None  # the checked answer, unreachable here
    assert second["error"] == REFUSED.format(name=name) and second["address"] is None
    assert dns.resolver.a_queries(name) == 2  # one lookup per attempt
    assert receiver.received == []


def test_a_delivery_by_name_reaches_the_receiver_through_the_checked_address(
        stack: Stack, tenant: Tenant, dns: Dns, receiver: WebhookReceiver) -> None:
    name = "hooks.bagel.test"
    dns.resolver.scripts[name] = ["127.0.0.1"]
    port = receiver.url.rsplit(":", 1)[1].split("/", 1)[0]
    with TestClient(create_app(stack.settings)) as client:  # private targets allowed, as in development
        ping = _ping(client, tenant, f"http://{name}:{port}/hooks")
        stack.start("webhooks", extra_env={"BAGEL_JOBS_WEBHOOK_DNS_SERVER": dns.server})
        got = receiver.wait_for("webhook.test", timeout_s=30)
        done = _wait_attempts(client, tenant, ping, 1, "delivered")
    assert got[0].headers["host"] == f"{name}:{port}" and got[0].path == "/hooks"
    assert got[0].headers["webhook-id"] == ping
    SvixWebhook(tenant.secret).verify(got[0].body, got[0].headers)
    assert done["attempts"][0]["address"] == "127.0.0.1" and done["attempts"][0]["status_code"] == 200
    assert dns.resolver.a_queries(name) == 1


@dataclass
class TlsReceiver:
    """An HTTPS server on 127.0.0.1 with a certificate for one name, recording the TLS server
    name (SNI) of every handshake and every request that got through."""

    cert: trustme.LeafCert
    server_names: list[str | None] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, name="tls-receiver", daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_https_sends_the_name_as_sni_and_verifies_the_certificate_against_it(
        stack: Stack, tenant: Tenant, dns: Dns, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = TlsReceiver(ca.issue_cert("hooks.bagel.test"))
    try:
        for name in ("hooks.bagel.test", "other.bagel.test"):
            dns.resolver.scripts[name] = ["127.0.0.1"]
        with TestClient(create_app(stack.settings)) as client:
            good = _ping(client, tenant, f"https://hooks.bagel.test:{tls.port}/hooks")
            wrong = _ping(client, tenant, f"https://other.bagel.test:{tls.port}/hooks")  # the cert is not for it
            stack.start("webhooks", extra_env={"BAGEL_JOBS_WEBHOOK_DNS_SERVER": dns.server,
                                               "SSL_CERT_FILE": str(ca_file)})
            delivered = _wait_attempts(client, tenant, good, 1, "delivered")
            refused = _wait_attempts(client, tenant, wrong, 1, "pending")  # a connection error: retried
    finally:
        tls.stop()
    assert delivered["attempts"][0]["address"] == "127.0.0.1"
    assert "certificate verify failed" in refused["attempts"][0]["error"].lower()
    assert "hostname mismatch" in refused["attempts"][0]["error"].lower()
    assert "hooks.bagel.test" in tls.server_names and "other.bagel.test" in tls.server_names
    [(headers, body)] = tls.requests  # only the verified connection carried a request
    assert headers["host"] == f"hooks.bagel.test:{tls.port}" and headers["webhook-id"] == good
    SvixWebhook(tenant.secret).verify(body, headers)
