"""``Idempotency-Key`` on creating POSTs: the same key and body replays the first response; the
same key with another body (or on another route) is a 409.

Owns: the request fingerprint and the record's life. The record is inserted in the SAME
transaction as what the request creates, so a crash cannot leave one without the other, and
two concurrent requests with one key cannot both create: the second hits the primary key,
rolls back and replays the first's response.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.errors import IdempotencyConflict, InvalidParameter
from worker.models import IdempotencyRecord, utcnow
from worker.params import check_text

MAX_KEY_CHARS = 255
REPLAY_HEADER = "Idempotent-Replayed"


def fingerprint(payload: Any) -> str:
    """SHA-256 of the request: canonical JSON for bodies (key order and spacing don't matter),
    raw bytes for uploads."""
    if isinstance(payload, bytes):
        return hashlib.sha256(payload).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def check_key(key: str | None) -> str | None:
    if key is not None and not 1 <= len(key) <= MAX_KEY_CHARS:
        raise InvalidParameter(f"Idempotency-Key: {len(key)} characters is outside 1..{MAX_KEY_CHARS}",
                               field="Idempotency-Key")
    if key is not None:
        check_text(key, "Idempotency-Key", allow_whitespace=False)
    return key


def replay(session: Session, tenant_id: str, key: str | None, route: str, digest: str) -> JSONResponse | None:
    """The stored response for this key, or None; a 409 when the key was used differently."""
    if key is None:
        return None
    record = session.scalar(select(IdempotencyRecord).where(
        IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key))
    session.commit()
    if record is None:
        return None
    if record.route != route or record.request_hash != digest:
        raise IdempotencyConflict(f"Idempotency-Key: {key!r} was already used with a different request "
                                  f"({record.route})", field="Idempotency-Key")
    return JSONResponse(record.response, status_code=record.status_code, headers={REPLAY_HEADER: "true"})


def commit_with_record(session: Session, tenant_id: str, key: str | None, route: str, digest: str,
                       status_code: int, response: dict[str, Any]) -> JSONResponse | None:
    """Commit the request's work together with its record. Returns None when this request won,
    or the winner's response when a concurrent request with the same key committed first."""
    if key is not None:
        session.add(IdempotencyRecord(tenant_id=tenant_id, key=key, route=route, request_hash=digest,
                                      status_code=status_code, response=response, created_at=utcnow()))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if key is None:
            raise
        winner = replay(session, tenant_id, key, route, digest)
        if winner is None:
            raise
        return winner
    return None
