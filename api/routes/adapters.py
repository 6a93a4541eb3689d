"""``/v1/adapters``: a tenant's LoRA adapters — upload (PEFT's two files, checked against the base
model), list, read, delete. Jobs and batches name one by id (``adapter``, ``adapter_scale``).

Leaves the checks and the storage to ``worker.adapters`` and the file format to
``bagel.adapter_format``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency
from api.body_limit import ADAPTER_CONFIG_BYTES
from api.contract import ID_PATTERN, READ, READ_ONE, WITH_BODY, IdempotencyKey, errors, id_path
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from worker import adapters, queries
from worker.adapters import SUPPORTED_TARGETS
from worker.errors import NotFound
from worker.models import Adapter

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
ROUTE = "POST /v1/adapters"
ADAPTER_ID = id_path("adapter", "3d9c2a1e-5b7f-4e8d-9a6c-1f2e3d4c5b6a")
MAX_CONFIG_BYTES = ADAPTER_CONFIG_BYTES
UPLOAD_TEXT = (
    "Register a PEFT LoRA adapter (`save_pretrained`'s two files) for this tenant's jobs. It is checked "
    "against the base model: every module it names must be one of the decoder's supported projections ("
    + ", ".join(f"`{t}`" for t in SUPPORTED_TARGETS) + "), with the base's shapes and the adapter's rank; "
    "otherwise a 422 names the module. Applied unmerged, so one loaded model serves every adapter.")


class AdapterOut(BaseModel):
    """A registered LoRA adapter."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        "id": "3d9c2a1e-5b7f-4e8d-9a6c-1f2e3d4c5b6a", "name": "brand-a", "rank": 16, "alpha": 32.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "size_bytes": 120_586_240,
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "created_at": "2026-11-28T12:00:00Z"}]})

    id: str = Field(description="pass it as a job's or batch's adapter")
    name: str = Field(description="unique per tenant")
    rank: int = Field(description="LoRA rank r")
    alpha: float = Field(description="lora_alpha: B·A is scaled by alpha/r (alpha/√r with rsLoRA)")
    target_modules: list[str] = Field(description="the decoder projections it changes")
    size_bytes: int = Field(description="of adapter_model.safetensors")
    sha256: str = Field(description="of adapter_model.safetensors")
    created_at: datetime = Field(description="when it was registered")


class AdapterList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [
        AdapterOut.model_config["json_schema_extra"]["examples"][0]]}]})  # type: ignore[index]

    data: list[AdapterOut] = Field(description="newest first")


def _out(row: Adapter) -> AdapterOut:
    return AdapterOut.model_validate(row)


def _not_found(adapter_id: str) -> NotFound:
    return NotFound(f"adapter_id: adapter {adapter_id!r} not found", field="adapter_id")


@router.post("", status_code=201, response_model=AdapterOut, responses=errors(*WITH_BODY),
             summary="Upload a LoRA adapter", description=UPLOAD_TEXT)
def upload_adapter(tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep,
                   name: Annotated[str, Form(min_length=1, max_length=adapters.MAX_NAME_CHARS,
                                             json_schema_extra={"pattern": ID_PATTERN},
                                             description="your name for it, unique per tenant")],
                   config: Annotated[UploadFile, File(description="adapter_config.json as PEFT writes it")],
                   weights: Annotated[UploadFile, File(description="adapter_model.safetensors as PEFT writes it")],
                   idempotency_key: IdempotencyKey = None) -> JSONResponse:
    key = idempotency.check_key(idempotency_key)
    config_bytes = config.file.read(MAX_CONFIG_BYTES + 1)
    weights_bytes = weights.file.read(settings.max_adapter_bytes + 1)
    digest = idempotency.fingerprint({"name": name, "config": hashlib.sha256(config_bytes).hexdigest(),
                                      "weights": hashlib.sha256(weights_bytes).hexdigest()})
    if (previous := idempotency.replay(session, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    row = adapters.register(session, store, settings, tenant.id, name, config_bytes, weights_bytes)
    body = _out(row).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, ROUTE, digest, 201, body)) is not None:
        return winner
    return JSONResponse(body, status_code=201)


@router.get("", response_model=AdapterList, responses=errors(*READ), summary="List adapters")
def list_adapters(tenant: TenantDep, session: SessionDep) -> AdapterList:
    """The tenant's adapters, newest first."""
    return AdapterList(data=[_out(row) for row in queries.list_adapters(session, tenant.id)])


@router.get("/{adapter_id}", response_model=AdapterOut, responses=errors(*READ_ONE), summary="Get an adapter")
def get_adapter(adapter_id: Annotated[str, ADAPTER_ID], tenant: TenantDep, session: SessionDep) -> AdapterOut:
    """One adapter's rank, targets and size."""
    row = queries.get_adapter(session, tenant.id, adapter_id)
    if row is None:
        raise _not_found(adapter_id)
    return _out(row)


@router.delete("/{adapter_id}", status_code=204, response_class=Response, responses=errors(*READ_ONE, 409),
               summary="Delete an adapter")
def delete_adapter(adapter_id: Annotated[str, ADAPTER_ID], tenant: TenantDep, session: SessionDep,
                   store: StoreDep) -> Response:
    """Delete the adapter and its files; 409 while queued or running jobs use it."""
    if not adapters.delete(session, store, tenant.id, adapter_id):
        raise _not_found(adapter_id)
    return Response(status_code=204)
