"""Webhook delivery from the outbox, and the checks on a callback URL.

Owns: the event envelope (``type``, ``timestamp``, ``data``; result keys become fresh
download URLs at send time), and ``deliver_due``: POST every due outbox row signed per
Standard Webhooks, record every attempt, retry non-2xx and timeouts with exponential backoff and
full jitter until ``webhook_retry_window_s`` after the event. The callback-URL policy
(``params.check_webhook_url``) is applied again, with DNS, before every POST. Leaves the rows
and their state to ``worker.jobs``, signatures to ``signing.py``.

Redirects are not followed (a 3xx is a failed attempt): following one would let a public URL
bounce the request to a private address.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select

from worker import outbox, signing
from worker.errors import InvalidWebhookUrl
from worker.models import Tenant, utcnow
from worker.params import check_webhook_url

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings
    from worker.storage import ResultStore

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0
MIN_BACKOFF_S = 0.05
BATCH_LIMIT = 100
USER_AGENT = "bagel-jobs-webhooks/1"


def _check_target(url: str, allow_private: bool) -> None:
    """The submission-time policy (``params.check_webhook_url``) applied again before a POST,
    with DNS: an answer may have changed since submission. A name that does not resolve right
    now is a transient failure (retried), a private target a permanent one."""
    check_webhook_url(url, allow_private=allow_private, resolve_dns=False)
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    try:
        socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc}") from exc
    check_webhook_url(url, allow_private=False, resolve_dns=True)


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


@dataclass
class _Due:
    id: str
    tenant_id: str
    event: str
    url: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


def deliver_due(settings: Settings, session: Callable[[], Session], store: ResultStore, *,
                limit: int = BATCH_LIMIT, client: httpx.Client | None = None) -> int:
    """Deliver every outbox row due now (oldest first); returns how many were delivered."""
    with session() as s:
        rows = outbox.due_deliveries(s, utcnow(), limit)
        due = [_Due(r.id, r.tenant_id, r.event, r.url, dict(r.payload), int(r.attempts), r.created_at)
               for r in rows]
        tenant_ids = {d.tenant_id for d in due}
        secrets = dict(s.execute(select(Tenant.id, Tenant.webhook_secret).where(Tenant.id.in_(tenant_ids))).all())
    if not due:
        return 0
    owns_client = client is None
    http = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False,
                                  headers={"user-agent": USER_AGENT})
    delivered = 0
    try:
        for d in due:
            delivered += _deliver_one(settings, session, store, http, d, secrets[d.tenant_id])
    finally:
        if owns_client:
            http.close()
    return delivered


def _deliver_one(settings: Settings, session: Callable[[], Session], store: ResultStore,
                 http: httpx.Client, d: _Due, secret: str) -> bool:
    attempt = d.attempts + 1
    body = envelope(d.event, d.created_at, d.payload,
                    lambda key: store.url(key, settings.presign_expiry_s))
    status_code: int | None = None
    error: str | None = None
    permanent = False
    start = time.perf_counter()
    try:
        _check_target(d.url, settings.webhook_allow_private)
        response = http.post(d.url, content=body, headers=signing.headers(secret, d.id, body))
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}"
    except InvalidWebhookUrl as exc:
        error, permanent = exc.message, True
    except (httpx.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    duration_ms = (time.perf_counter() - start) * 1000.0
    ok = error is None
    next_at: datetime | None = None
    if not ok and not permanent:
        delay = next_delay_s(settings.retry_backoff_s, attempt)
        candidate = utcnow() + timedelta(seconds=delay)
        if candidate <= d.created_at + timedelta(seconds=settings.webhook_retry_window_s):
            next_at = candidate
    with session() as s:
        outbox.record_attempt(s, d.id, status_code=status_code, error=error, duration_ms=duration_ms,
                            delivered=ok, next_attempt_at=next_at)
    if ok:
        log.info("webhook %s %s attempt %d: %d in %.0f ms", d.id, d.event, attempt, status_code, duration_ms)
    elif next_at is not None:
        log.warning("webhook %s attempt %d: %s, retry in %.1f s", d.id, attempt, error,
                    (next_at - utcnow()).total_seconds())
    else:
        log.error("webhook %s attempt %d: %s, giving up", d.id, attempt, error)
    return ok
