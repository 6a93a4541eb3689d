"""A tenant's LoRA adapters in the service: registering an upload, listing, deleting.

Owns: the upload check against the base model — ``bagel.adapter_format`` reads the PEFT files
without torch and compares every module, shape and rank with the base model's configuration,
read from the checkpoint folder's config files (``MODEL_PATH``, or the tiny demo checkpoint once
a GPU worker made it) — storing the two files content-addressed (``adapters/{tenant}/{sha256}``),
the row, and deleting (refused while queued or running jobs use the adapter; finished jobs keep
their record without it). Where no configuration is readable (an API host without the model
mounted) the format and the internal consistency are still checked, and a GPU worker checks the
rest when it loads the adapter: a job whose adapter does not fit fails with ``invalid_adapter``.
Leaves the HTTP form to ``api.routes.adapters`` and applying adapters to ``worker.gpu``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bagel.adapter_format import SUPPORTED_TARGETS, inspect_adapter
from bagel.config import ModelConfig
from bagel.errors import AdapterError, CheckpointError
from worker.errors import AdapterInUse, InvalidAdapter, InvalidParameter
from worker.models import ACTIVE_STATUSES, Adapter, Job, utcnow
from worker.params import check_text
from worker.settings import TINY_MODEL_DIR, Settings
from worker.storage import ResultStore, adapter_keys

log = logging.getLogger(__name__)
MAX_NAME_CHARS = 100
__all__ = ["SUPPORTED_TARGETS", "AdapterSource", "adapter_source", "base_config", "delete", "register"]  # the targets: for the API's docs


def base_config(settings: Settings) -> ModelConfig | None:
    """The base model's architecture from its config files, or None where none is readable."""
    folder = Path(settings.model_path) if settings.model_path is not None else TINY_MODEL_DIR
    try:
        return ModelConfig.from_folder(folder)
    except (CheckpointError, OSError):
        return None


def register(session: Session, store: ResultStore, settings: Settings, tenant_id: str, name: str,
             config_bytes: bytes, weights_bytes: bytes) -> Adapter:
    """Check and store an upload; the new row, flushed, for the caller to commit (with its
    idempotency record). ``InvalidAdapter`` names the module or key at fault; a name the tenant
    already uses is a 422 on ``name``."""
    check_text(name, "name", allow_whitespace=False)
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise InvalidParameter(f"name: {len(name)} characters is outside 1..{MAX_NAME_CHARS}", field="name")
    if len(weights_bytes) > settings.max_adapter_bytes:
        raise InvalidAdapter(f"weights: {len(weights_bytes):,} bytes exceeds the {settings.max_adapter_bytes:,} "
                             "byte limit", field="weights")
    try:
        info = inspect_adapter(config_bytes, weights_bytes, base_config(settings))
    except AdapterError as exc:  # names the module or the config key
        raise InvalidAdapter(str(exc), field="config" if exc.key else "weights") from exc
    sha256 = hashlib.sha256(weights_bytes).hexdigest()
    config_key, weights_key = adapter_keys(tenant_id, sha256)
    store.put(config_key, config_bytes, "application/json")
    store.put(weights_key, weights_bytes, "application/octet-stream")
    row = Adapter(tenant_id=tenant_id, name=name, sha256=sha256, config_key=config_key, weights_key=weights_key,
                  rank=info.rank, alpha=info.alpha, target_modules=list(info.target_modules),
                  size_bytes=len(weights_bytes), created_at=utcnow())
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise InvalidParameter(f"name: the tenant already has an adapter named {name!r}", field="name") from None
    log.info("adapter %s (%s) registered for tenant %s: rank %d, %d modules, %d bytes", row.id, name, tenant_id,
             info.rank, len(info.target_modules), len(weights_bytes))
    return row


def delete(session: Session, store: ResultStore, tenant_id: str, adapter_id: str) -> bool:
    """Delete the adapter and its files; False when the tenant has no such adapter."""
    row = session.scalar(select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant_id))
    if row is None:
        return False
    active = session.scalar(select(Job.id).where(Job.adapter_id == row.id, Job.status.in_(list(ACTIVE_STATUSES)))
                            .limit(1))
    if active is not None:
        raise AdapterInUse(f"adapter_id: queued or running jobs use adapter {adapter_id!r} (e.g. job {active}); "
                           "cancel them or wait", field="adapter_id")
    shared = session.scalar(select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.sha256 == row.sha256,
                                                     Adapter.id != row.id).limit(1))
    session.delete(row)
    session.commit()
    if shared is None:  # the same files under another name stay
        store.delete(row.config_key)
        store.delete(row.weights_key)
    return True


@dataclass(frozen=True)
class AdapterSource:
    """The adapter a chunk runs with: its id (the GPU worker's cache key), the scale its jobs
    ask for, and how to read its two files (called only on a cache miss)."""

    adapter_id: str
    scale: float
    read_config: Callable[[], bytes]
    read_weights: Callable[[], bytes]


def adapter_source(sessions: Callable[[], Session], store: ResultStore, adapter_id: str | None,
                   params: dict[str, Any]) -> AdapterSource | None:
    """The chunk's adapter (every job of a chunk has the same one: it is part of the chunk key),
    or None for the base model. An adapter deleted meanwhile is ``InvalidAdapter`` (the jobs
    fail: what they asked for is gone)."""
    if adapter_id is None:
        return None
    with sessions() as session:
        row = session.get(Adapter, adapter_id)
        keys = None if row is None else (row.config_key, row.weights_key)
    if keys is None:
        raise InvalidAdapter(f"adapter: adapter {adapter_id!r} no longer exists", field="adapter")
    config_key, weights_key = keys
    return AdapterSource(adapter_id=adapter_id, scale=float(params.get("adapter_scale", 1.0)),
                         read_config=lambda: store.get(config_key), read_weights=lambda: store.get(weights_key))
