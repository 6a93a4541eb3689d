"""Webhook delivery from the outbox.

Owns: the event envelope (``type``, ``timestamp``, ``data``; result keys become fresh
download URLs at send time), and ``deliver_due``: POST every due outbox row signed per
Standard Webhooks, record every attempt, retry non-2xx and timeouts with exponential backoff and
full jitter until ``webhook_retry_window_s`` after the event (or after its last replay). Leaves
the rows and their state to ``outbox.py``, signatures to ``signing.py`` and the URL policy to
``webhook_targets.py``.

Each attempt resolves the callback's host once (``webhook_targets.resolve_target``: every
answer checked) and connects to a checked address and nowhere else: the request goes to
``http(s)://<address>:<port>/…`` with the URL's own ``Host`` header, and for https the host as
the TLS server name (httpx's ``sni_hostname`` extension), so SNI and certificate verification
are against the host, as if connecting by name. Each attempt has its own client: a pooled
connection is keyed by address alone and could otherwise carry a request for one host over a
TLS session verified for another. Environment proxies are ignored (a proxy would resolve the
name itself). A refused address is a permanent failure (the delivery fails without retry:
where a name points is the client's setting, to fix and then replay); a name that does not
resolve, or a connection or HTTP error, is retried.

Redirects are not followed (a 3xx is a failed attempt): following one would let a public URL
bounce the request to a private address.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select

from worker import outbox, signing, webhook_targets
from worker.errors import InvalidWebhookUrl, WebhookDnsFailure
from worker.models import Tenant, utcnow
from worker.webhook_targets import Target

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings
    from worker.storage import ResultStore

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0
MIN_BACKOFF_S = 0.05
BATCH_LIMIT = 100
USER_AGENT = "bagel-jobs-webhooks/1"


def next_delay_s(base_s: float, attempt: int, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff after failed attempt number ``attempt`` (1-based)."""
    cap = min(max(base_s, MIN_BACKOFF_S) * 2 ** (attempt - 1), MAX_BACKOFF_S)
    return (rng or random).uniform(cap / 2, cap)


def _with_urls(value: Any, url_for: Callable[[str], str]) -> Any:
    """Copy of ``value`` where every ``{"output_key": k}`` also gets ``"output_url"``."""
    if isinstance(value, dict):
        out = {k: _with_urls(v, url_for) for k, v in value.items()}
        key = value.get("output_key")
        if isinstance(key, str) and key:
            out["output_url"] = url_for(key)
        return out
    if isinstance(value, list):
        return [_with_urls(v, url_for) for v in value]
    return value


def envelope(event: str, created_at: datetime, payload: dict[str, Any], url_for: Callable[[str], str]) -> bytes:
    """The JSON body of one delivery: ``{"type", "timestamp", "data"}`` (Standard Webhooks
    style). Outbox rows already hold that envelope; a bare payload is wrapped. Result keys get
    download URLs minted now, so a late retry still carries URLs that work."""
    if "type" in payload and "data" in payload:
        body = dict(payload, data=_with_urls(payload["data"], url_for))
    else:
        body = {"type": event, "timestamp": created_at.isoformat().replace("+00:00", "Z"),
                "data": _with_urls(payload, url_for)}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def _post(target: Target, address: str, body: bytes, headers: dict[str, str], timeout_s: float,
          ssl_context: ssl.SSLContext) -> httpx.Response:
    """POST ``body`` to ``target`` over a connection to ``address`` (see the module docstring)."""
    url = httpx.URL(target.url)
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else None
    with httpx.Client(timeout=timeout_s, follow_redirects=False, verify=ssl_context, trust_env=False) as http:
        return http.post(url.copy_with(host=address), content=body, extensions=extensions,
                         headers={**headers, "host": url.netloc.decode("ascii"), "user-agent": USER_AGENT})


@dataclass
class _Due:
    id: str
    tenant_id: str
    event: str
    url: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime
    window_from: datetime  # the event, or its last replay


def deliver_due(settings: Settings, session: Callable[[], Session], store: ResultStore, *,
                limit: int = BATCH_LIMIT) -> int:
    """Deliver every outbox row due now (oldest first); returns how many were delivered."""
    with session() as s:
        rows = outbox.due_deliveries(s, utcnow(), limit)
        due = [_Due(r.id, r.tenant_id, r.event, r.url, dict(r.payload), int(r.attempts), r.created_at,
                    r.replayed_at or r.created_at) for r in rows]
        tenant_ids = {d.tenant_id for d in due}
        secrets = dict(s.execute(select(Tenant.id, Tenant.webhook_secret).where(Tenant.id.in_(tenant_ids))).all())
    if not due:
        return 0
    # One TLS context for the run (loading the CA bundle is the costly part); SSL_CERT_FILE and
    # SSL_CERT_DIR still choose the bundle, as they do for httpx.
    ssl_context = httpx.create_ssl_context()
    return sum(_deliver_one(settings, session, store, ssl_context, d, secrets[d.tenant_id]) for d in due)


@dataclass
class _Outcome:
    status_code: int | None = None
    error: str | None = None
    address: str | None = None  # the checked address connected to (or tried last)
    permanent: bool = False  # no retry


def _attempt(settings: Settings, ssl_context: ssl.SSLContext, d: _Due, body: bytes, secret: str) -> _Outcome:
    """One attempt: resolve and check, then POST to the first checked address that takes the
    connection (as clients do with several DNS answers)."""
    out = _Outcome()
    try:
        target = webhook_targets.resolve_target(d.url, allow_private=settings.webhook_allow_private,
                                                dns_server=settings.webhook_dns_server,
                                                timeout_s=settings.webhook_timeout_s)
        headers = signing.headers(secret, d.id, body)
        for i, address in enumerate(target.addresses):
            out.address = address
            try:
                response = _post(target, address, body, headers, settings.webhook_timeout_s, ssl_context)
                break
            except httpx.ConnectError as exc:
                if i == len(target.addresses) - 1:
                    raise
                log.warning("webhook %s: %s (%s) refused the connection: %s; trying the next address",
                            d.id, target.host, address, exc)
        out.status_code = response.status_code
        if not 200 <= response.status_code < 300:
            out.error = f"HTTP {response.status_code}"
    except InvalidWebhookUrl as exc:
        out.error, out.permanent = f"{exc.code}: {exc.message}", True
    except WebhookDnsFailure as exc:
        out.error = f"{exc.code}: {exc.message}"
    except (httpx.HTTPError, OSError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def _deliver_one(settings: Settings, session: Callable[[], Session], store: ResultStore,
                 ssl_context: ssl.SSLContext, d: _Due, secret: str) -> bool:
    attempt = d.attempts + 1
    body = envelope(d.event, d.created_at, d.payload,
                    lambda key: store.url(key, settings.presign_expiry_s))
    start = time.perf_counter()
    out = _attempt(settings, ssl_context, d, body, secret)
    duration_ms = (time.perf_counter() - start) * 1000.0
    ok = out.error is None
    next_at: datetime | None = None
    if not ok and not out.permanent:
        delay = next_delay_s(settings.retry_backoff_s, attempt)
        candidate = utcnow() + timedelta(seconds=delay)
        if candidate <= d.window_from + timedelta(seconds=settings.webhook_retry_window_s):
            next_at = candidate
    with session() as s:
        outbox.record_attempt(s, d.id, status_code=out.status_code, error=out.error, duration_ms=duration_ms,
                              delivered=ok, next_attempt_at=next_at, address=out.address)
    if ok:
        log.info("webhook %s %s attempt %d: %d in %.0f ms", d.id, d.event, attempt, out.status_code, duration_ms)
    elif next_at is not None:
        log.warning("webhook %s attempt %d: %s, retry in %.1f s", d.id, attempt, out.error,
                    (next_at - utcnow()).total_seconds())
    else:
        log.error("webhook %s attempt %d: %s, giving up", d.id, attempt, out.error)
    return ok
