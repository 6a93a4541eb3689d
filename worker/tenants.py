"""Tenants, their API keys and their webhook signing secrets.

Owns: creating tenants (each with a Standard Webhooks secret ``whsec_<base64>``), issuing API
keys (shown once, stored as a SHA-256 hash), looking a presented key up, revoking keys and
rotating secrets. Leaves HTTP auth to ``api/deps.py`` and signing to ``worker.signing``.

Keys are 32 random bytes, so a fast hash is enough: there is nothing to brute-force, and the
lookup is by the hash's unique index, not by comparing strings in Python.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker.errors import InvalidParameter, NotFound
from worker.models import ApiKey, Tenant, new_id, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "bj_"
SECRET_PREFIX = "whsec_"
MAX_NAME_CHARS = 200


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
