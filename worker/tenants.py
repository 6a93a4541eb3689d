"""Tenants, their API keys and their webhook signing secrets.

Owns: creating tenants (each with a Standard Webhooks secret ``whsec_<base64>``), issuing API
keys (shown once, stored as a SHA-256 hash), looking a presented key up, revoking keys,
rotating secrets, and storing the tenant's scheduling weight and limits. Leaves HTTP auth to
``api/deps.py``, signing to ``worker.signing``, enforcing the submit limits to
``worker.limits`` and the weight and running-chunk limit to the dispatcher.

Keys are 32 random bytes, so a fast hash is enough: there is nothing to brute-force, and the
lookup is by the hash's unique index, not by comparing strings in Python.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import secrets
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker.errors import InvalidParameter, NotFound
from worker.models import ApiKey, Tenant, new_id, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "bj_"
SECRET_PREFIX = "whsec_"
MAX_NAME_CHARS = 200
# The limits ``set_limits`` changes: name → (type, the largest value). None stores "unlimited".
LIMIT_FIELDS: dict[str, tuple[type, float]] = {
    "requests_per_minute": (int, 1_000_000),
    "max_waiting_jobs": (int, 10_000_000),
    "max_running_chunks": (int, 100_000),
    "monthly_gpu_seconds": (float, 1e12),
}
MAX_WEIGHT = 1000.0


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def create_tenant(session: Session, name: str) -> Tenant:
    """A new tenant named ``name`` (unique) with a fresh webhook secret."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidParameter(f"name: {name!r} must be 1..{MAX_NAME_CHARS} characters", field="name")
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise InvalidParameter(f"name: a tenant named {name!r} already exists", field="name")
    tenant = Tenant(id=new_id(), name=name, webhook_secret=new_webhook_secret(), created_at=utcnow())
    session.add(tenant)
    session.commit()
    log.info("tenant %s created", tenant.id)
    return tenant


def find_tenant(session: Session, name_or_id: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where((Tenant.id == name_or_id) | (Tenant.name == name_or_id)))
    if tenant is None:
        raise NotFound(f"tenant: no tenant with id or name {name_or_id!r}", field="tenant")
    return tenant


def create_api_key(session: Session, tenant_id: str, name: str = "") -> tuple[ApiKey, str]:
    """Issue a key for the tenant. Returns the row and the plaintext key (shown only now)."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id(), tenant_id=tenant_id, name=name[:MAX_NAME_CHARS], prefix=plaintext[:10],
                 key_hash=hash_key(plaintext), created_at=utcnow())
    session.add(row)
    session.commit()
    log.info("api key %s (%s…) issued for tenant %s", row.id, row.prefix, tenant_id)
    return row, plaintext


def authenticate(session: Session, plaintext: str) -> Tenant | None:
    """The tenant owning an unrevoked key, or ``None``."""
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 200:
        return None
    tenant = session.scalar(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None))
    )
    session.commit()
    return tenant


def find_api_key(session: Session, id_or_prefix: str) -> ApiKey:
    """The key with this id, or the one key with this prefix (the key's first 10 characters:
    ``bj_`` and 7 more)."""
    rows = session.scalars(select(ApiKey).where((ApiKey.id == id_or_prefix) | (ApiKey.prefix == id_or_prefix))).all()
    if not rows:
        raise NotFound(f"key: no API key with id or prefix {id_or_prefix!r}", field="key")
    if len(rows) > 1:
        raise InvalidParameter(f"key: prefix {id_or_prefix!r} matches {len(rows)} keys; give the key id", field="key")
    return rows[0]


def revoke_api_key(session: Session, key_id: str) -> bool:
    rows = session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                           .values(revoked_at=utcnow())).rowcount
    session.commit()
    return bool(rows)


def webhook_secret(session: Session, tenant_id: str) -> str:
    """The tenant's current ``whsec_…`` secret (for signing deliveries)."""
    secret = session.scalar(select(Tenant.webhook_secret).where(Tenant.id == tenant_id))
    session.commit()
    if secret is None:
        raise NotFound(f"tenant: no tenant with id {tenant_id!r}", field="tenant_id")
    return secret


def rotate_webhook_secret(session: Session, tenant_id: str) -> str:
    secret = new_webhook_secret()
    rows = session.execute(update(Tenant).where(Tenant.id == tenant_id).values(webhook_secret=secret)).rowcount
    session.commit()
    if not rows:
        raise NotFound(f"tenant: no tenant with id {tenant_id!r}", field="tenant_id")
    return secret


def get_limits(session: Session, name_or_id: str) -> dict[str, Any]:
    """The tenant's scheduling weight and limits (None: unlimited), as a JSON-ready dict."""
    tenant = find_tenant(session, name_or_id)
    session.commit()
    return _limits_of(tenant)


def set_limits(session: Session, name_or_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Change some of the tenant's limits (``LIMIT_FIELDS``; None clears one) and ``weight``;
    fields not in ``changes`` keep their values. Returns the limits after the change."""
    values = {name: _checked_limit(name, value) for name, value in changes.items()}
    tenant = find_tenant(session, name_or_id)
    if values:
        session.execute(update(Tenant).where(Tenant.id == tenant.id).values(**values))
        session.refresh(tenant)
        log.info("tenant %s limits changed: %s", tenant.id, ", ".join(f"{k}={v}" for k, v in values.items()))
    session.commit()
    return _limits_of(tenant)


def quality_settings(session: Session, name_or_id: str, *, dedupe: bool | None = None,
                     gate_questions: Any = None) -> dict[str, Any]:
    """The tenant's exact-request dedupe switch and quality-gate question set (None: the
    built-in one), after changing those given: ``dedupe`` on or off, ``gate_questions`` a set
    (``quality.check_question_set``) or the string ``builtin`` to go back to the built-in one."""
    from worker.quality import check_question_set

    tenant = find_tenant(session, name_or_id)
    values: dict[str, Any] = {}
    if dedupe is not None:
        values["dedupe"] = bool(dedupe)
    if gate_questions == "builtin":
        values["gate_questions"] = None
    elif gate_questions is not None:
        values["gate_questions"] = check_question_set(gate_questions)
    if values:
        session.execute(update(Tenant).where(Tenant.id == tenant.id).values(**values))
        session.refresh(tenant)
        log.info("tenant %s quality settings changed: %s", tenant.id, ", ".join(sorted(values)))
    session.commit()
    return {"tenant_id": tenant.id, "name": tenant.name, "dedupe": tenant.dedupe,
            "gate_questions": tenant.gate_questions}


def _checked_limit(name: str, value: Any) -> int | float | None:
    if name == "weight":
        if value is None or isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or not 0 < value <= MAX_WEIGHT:
            raise InvalidParameter(f"weight: {value!r} must be a number > 0 and <= {MAX_WEIGHT:g}", field="weight")
        return float(value)
    if name not in LIMIT_FIELDS:
        raise InvalidParameter(f"{name}: not a tenant limit (one of weight, {', '.join(LIMIT_FIELDS)})", field=name)
    if value is None:
        return None
    kind, high = LIMIT_FIELDS[name]
    ok_type = isinstance(value, int) if kind is int else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok_type or not 0 <= value <= high:
        noun = "an integer" if kind is int else "a number"
        raise InvalidParameter(f"{name}: {value!r} must be {noun} in 0..{high:,.0f}, or none for unlimited",
                               field=name)
    return kind(value)


def _limits_of(tenant: Tenant) -> dict[str, Any]:
    return {"tenant_id": tenant.id, "name": tenant.name, "weight": tenant.weight,
            **{name: getattr(tenant, name) for name in LIMIT_FIELDS}}
