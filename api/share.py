"""Share links to a batch's gallery page: signed, expiring tokens.

Owns: the token — ``<expires>.<tenant id>.<signature>``, where ``expires`` is Unix seconds and
the signature is the unpadded urlsafe base64 of HMAC-SHA256 over the purpose (``gallery``), the
tenant id, the batch id and ``expires`` — its key, its checks (constant-time; an expired link
is told apart from an invalid one, and both are refused), the limits on a link's lifetime and
the request and response bodies of ``POST /v1/batches/{id}/share``. Leaves the routes and the
page to ``api.routes.gallery`` and ``api.gallery``.

The batch id is not in the token: it is the page's path, and the signature covers it, so a
token shown with another batch's path is invalid. The tenant id is in it (ids are not secrets)
so that a link is checked before any database read and the batch is then read tenant-scoped.
Nothing is stored: a link cannot be revoked on its own, only all at once by changing the key.

The key is derived from ``worker.storage.local_signing_key`` (``URL_SIGNING_KEY``, else a key
file in ``storage_dir``) under a label of its own, so a gallery token is never a valid download
signature or the other way round. API hosts that do not share ``storage_dir`` must set the same
``URL_SIGNING_KEY``, or a link made on one host is refused by the others.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from worker.errors import ShareLinkExpired, ShareLinkInvalid
from worker.settings import Settings
from worker.storage import local_signing_key

PURPOSE = "gallery"
KEY_LABEL = b"bagel-jobs gallery share"
DAY_S = 86400
DEFAULT_EXPIRES_IN_S = 7 * DAY_S
MIN_EXPIRES_IN_S = 60
MAX_EXPIRES_IN_S = 30 * DAY_S
# expires (up to 12 digits), a tenant id (a uuid; up to 64 id characters), 32 bytes of HMAC
# (43 urlsafe base64 characters, unpadded). Anything else is refused before any HMAC is computed.
_TOKEN_RE = re.compile(r"(?P<expires>[0-9]{1,12})\.(?P<tenant>[A-Za-z0-9-]{1,64})\.(?P<sig>[A-Za-z0-9_-]{43})")


class ShareIn(BaseModel):
    """How long the link stays valid (the body may be left out: 7 days)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"expires_in_s": 86400}]})

    expires_in_s: int = Field(DEFAULT_EXPIRES_IN_S, ge=MIN_EXPIRES_IN_S, le=MAX_EXPIRES_IN_S,
                              description="seconds from now until the link stops working "
                              "(default 7 days; 60 s to 30 days)")


class ShareOut(BaseModel):
    """A link to the batch's gallery page: anyone holding it sees the page until it expires."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "url": "https://bagel.example.com/batches/0b7e2f6c-1d2a-4c56-9e3f-6a8b1c2d3e4f?token=1765188000."
               "5f0c3a9e-8b1d-4e2f-a6c7-d8e9f0a1b2c3.yJ3m0vQ8kLrT2aZp6nWc1xE4sHfG7uDb9iK5oN-_qRw",
        "expires_at": "2026-12-08T10:00:00Z"}]})

    url: str = Field(description="the gallery page: `<public base URL>/batches/<batch id>?token=…`; no API key "
                     "needed, the token is the credential (treat the link as a secret)")
    expires_at: datetime = Field(description="when the link stops working (the page, its live updates and "
                                 "the zip download alike)")


@dataclass(frozen=True)
class Grant:
    """What a verified token allows: reading one batch of one tenant until ``expires_at``."""

    tenant_id: str
    batch_id: str
    expires_at: int


def share_key(settings: Settings) -> bytes:
    """The gallery's HMAC key: the URL signing key under the gallery's own label."""
    return hmac.new(local_signing_key(settings), KEY_LABEL, hashlib.sha256).digest()


def _signature(key: bytes, tenant_id: str, batch_id: str, expires_at: int) -> str:
    # Newline-separated: no part can hold one (the token's form and the path check refuse it).
    message = "\n".join((PURPOSE, tenant_id, batch_id, str(expires_at))).encode()
    return base64.urlsafe_b64encode(hmac.new(key, message, hashlib.sha256).digest()).rstrip(b"=").decode()


def sign(key: bytes, tenant_id: str, batch_id: str, expires_at: int) -> str:
    """The token letting its holder read ``batch_id`` of ``tenant_id`` until ``expires_at`` (Unix s)."""
    return f"{int(expires_at)}.{tenant_id}.{_signature(key, tenant_id, batch_id, int(expires_at))}"


def verify(key: bytes, token: str | None, batch_id: str, now: float | None = None) -> Grant:
    """The grant of ``token`` for ``batch_id``. Raises ``ShareLinkInvalid`` when it is missing,
    malformed or its signature does not match (altered, another batch's, another key's), and
    ``ShareLinkExpired`` when it is genuine but its expiry has passed."""
    found = _TOKEN_RE.fullmatch(token or "")
    if found is None:
        reason = "has no token" if not token else "has a malformed token"
        raise ShareLinkInvalid(f"token: the share link {reason}; ask for a new link", field="token")
    expires_at, tenant_id = int(found["expires"]), found["tenant"]
    if not hmac.compare_digest(_signature(key, tenant_id, batch_id, expires_at), found["sig"]):
        raise ShareLinkInvalid("token: the share link is invalid (altered, or made for another batch); "
                               "ask for a new link", field="token")
    now = time.time() if now is None else now
    if expires_at <= now:
        raise ShareLinkExpired(f"token: the share link expired at {expiry_text(expires_at)} "
                               f"({int(now - expires_at)} s ago); ask for a new link", field="token")
    return Grant(tenant_id=tenant_id, batch_id=batch_id, expires_at=expires_at)


def expiry_text(expires_at: int) -> str:
    """``2026-12-08 10:00:00 UTC``: how the page and the refusals show an expiry."""
    return datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
