"""Webhook signatures per the Standard Webhooks specification (standardwebhooks.com).

Owns: the three headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), the
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` signature with a ``whsec_<base64>``
secret, and a verifier (used by the demo's receiver) with a timestamp tolerance. Leaves secret
generation and storage to ``tenants.py`` and delivery to ``webhooks.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
TOLERANCE_S = 5 * 60


class SignatureError(ValueError):
    """Raised when a webhook's headers are missing, too old or too new, or no signature matches."""

    code = "bad_signature"


def secret_bytes(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_<base64>`` secret (the prefix is optional, as in the spec)."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise SignatureError(f"secret: not base64 after the {SECRET_PREFIX!r} prefix") from exc


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 signature>`` of ``body`` sent as message ``msg_id`` at ``timestamp``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers of one delivery attempt (a retry signs again with a fresh timestamp)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
        "content-type": "application/json",
    }


def verify(secret: str, body: bytes, received: dict[str, str], *, now: float | None = None,
           tolerance_s: int = TOLERANCE_S) -> str:
    """Check a received webhook and return its ``webhook-id``; raises ``SignatureError``.

    ``received`` maps header names (any case) to values. Several space-separated signatures are
    allowed (key rotation); one matching ``v1`` signature is enough.
    """
    lower = {k.lower(): v for k, v in received.items()}
    try:
        msg_id, ts_text, sig_field = (lower["webhook-id"], lower["webhook-timestamp"],
                                      lower["webhook-signature"])
    except KeyError as exc:
        raise SignatureError(f"headers: {exc.args[0]} is missing") from exc
    try:
        ts = int(ts_text)
    except ValueError as exc:
        raise SignatureError(f"webhook-timestamp: {ts_text!r} is not an integer") from exc
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise SignatureError(f"webhook-timestamp: {ts} is more than {tolerance_s} s from now ({int(current)})")
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1]
    for candidate in sig_field.split():
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value, expected):
            return msg_id
    raise SignatureError("webhook-signature: no v1 signature matches the body")
