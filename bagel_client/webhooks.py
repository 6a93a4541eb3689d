"""Receiving the service's webhooks: verify the Standard Webhooks signature, read the event.

Owns: ``verify_webhook(secret, headers, body)``, which checks ``webhook-id``,
``webhook-timestamp`` (within 5 minutes of now) and ``webhook-signature`` (HMAC-SHA256 over
``id.timestamp.body`` with the tenant's ``whsec_`` secret) with the independent
``standardwebhooks`` package, then parses the body into an ``Event``. Verify the raw bytes as
they arrived: a body parsed and serialised again no longer matches its signature. Leaves
receiving the HTTP request to the caller's web framework, and dropping repeats (by
``Event.id``) to the caller's storage.

    event = verify_webhook(secret, request.headers, await request.body())
    if event.type == "batch.completed": ...
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any

import standardwebhooks

from bagel_client.errors import WebhookVerificationError
from bagel_client.models import Event, parse_datetime


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str) -> Event:
    """The event of a verified webhook; raises ``WebhookVerificationError`` when a header is
    missing, the timestamp is out of tolerance, no signature matches or the body is not an
    event. ``headers``: any mapping (names in any case), e.g. your framework's request headers."""
    plain = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        payload: Any = standardwebhooks.Webhook(secret).verify(body, plain)
    # A malformed signature header or secret surfaces as ValueError/binascii.Error from the package.
    except (standardwebhooks.WebhookVerificationError, ValueError, binascii.Error) as exc:
        raise WebhookVerificationError(f"webhook {plain.get('webhook-id', '?')}: {exc}") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        raise WebhookVerificationError(f"webhook {plain['webhook-id']}: the body is not an event object")
    data = payload.get("data")
    timestamp = payload.get("timestamp")
    return Event(id=plain["webhook-id"], type=payload["type"],
                 timestamp=parse_datetime(timestamp) if isinstance(timestamp, str) else None,
                 data=data if isinstance(data, dict) else {}, raw=payload)
