"""From validated request bodies to job specs.

Owns: the edge checks that need the database or the settings — input files the tenant owns,
image counts per task, batch size, output size, webhook URL policy — the merge of batch
defaults into items, a re-run's request (``rerun_spec``), the request hash of the jobs an identical
job may answer (``with_request_hashes``, ``worker.dedupe``), and the deadline (``deadline_s`` in
the body, the ``Cancel-After`` header). The tenant's limits are ``worker.limits``' (their HTTP
form: ``api/errors.py``). Nothing here talks to the broker: the committed jobs wait in the
database for the dispatcher (``worker.scheduler``). Leaves the per-parameter rules to
``worker.params`` and the state change to ``worker.jobs``.

Every error is raised before anything is stored or enqueued; its field is the full path in the
body (``items[3].params.num_timesteps``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from api.quality_schemas import QualityGateIn
from api.schemas import MAX_DEADLINE_S, BatchIn, GenerationParamsIn, JobIn
from worker import dedupe, params, quality, queries, webhook_targets
from worker.errors import (
    BatchTooLarge,
    InvalidInput,
    InvalidParameter,
    UnknownAdapter,
    UnknownFile,
)
from worker.jobs import JobSpec
from worker.models import File, Job, Tenant
from worker.settings import Settings

CANCEL_AFTER_FIELD = "header.Cancel-After"
_SECONDS = re.compile(r"[0-9]{1,12}")
_DURATION_PART = re.compile(r"([0-9]{1,9})([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@contextmanager
def located(prefix: str) -> Iterator[None]:
    """Re-raise input errors with ``prefix`` in front of their field and message."""
    try:
        yield
    except InvalidInput as exc:
        if not prefix:
            raise
        field = f"{prefix}.{exc.field}" if exc.field else prefix
        raise type(exc)(f"{prefix}.{exc.message}", field=field) from exc


def params_dict(*layers: GenerationParamsIn | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            out.update(layer.model_dump(exclude_none=True))
    if "cfg_interval" in out:
        out["cfg_interval"] = list(out["cfg_interval"])
    return out


def _spec(settings: Settings, owned: dict[str, File], *, task: str, prompt: str, file_ids: Sequence[str],
          think: bool, width: int | None, height: int | None, seed: int | None, user_params: dict[str, Any],
          metadata: dict[str, Any] | None, gate: QualityGateIn | dict[str, Any] | None = None) -> JobSpec:
    params.check_task(task)
    params.check_prompt(prompt)
    params.check_input_count(task, len(file_ids))
    for i, file_id in enumerate(file_ids):
        if file_id not in owned:
            raise UnknownFile(f"input_file_ids[{i}]: file {file_id!r} not found", field=f"input_file_ids[{i}]")
    if seed is not None:
        user_params["seed"] = seed
    seed_given = user_params.get("seed") is not None
    resolved = params.resolve(task, user_params, think)
    if gate is not None:
        if task not in quality.GATED_TASKS:
            raise InvalidParameter(f"quality_gate: only {', '.join(quality.GATED_TASKS)} jobs make a picture to judge, "
                                   f"not {task}", field="quality_gate")
        gate = gate.model_dump() if isinstance(gate, QualityGateIn) else gate
        resolved["quality_gate"] = quality.gate_params(gate["threshold"], gate["max_regenerations"])
    first = owned[file_ids[0]] if file_ids else None
    out_w, out_h = params.resolve_size(task, width, height, max_side_px=settings.max_output_side_px,
                                       input_size=(first.width, first.height) if first else None,
                                       constants=params.picture_constants(settings.model_path))
    return JobSpec(task=task, prompt=prompt, params=resolved, input_file_ids=tuple(file_ids), think=think,
                   width=out_w, height=out_h, metadata=params.check_metadata(metadata), seed_given=seed_given)


def adapter_choice(session: Session, tenant_id: str, adapter: str | None,
                   scale: float | None) -> tuple[str | None, dict[str, float]]:
    """The adapter id to run with (the tenant's, else a 422 naming ``adapter``) and the params it
    adds (``adapter_scale``, default 1.0); a scale without an adapter is refused."""
    if adapter is None:
        if scale is not None:
            raise InvalidParameter("adapter_scale: only with an adapter", field="adapter_scale")
        return None, {}
    params.check_text(adapter, "adapter", allow_whitespace=False)
    if queries.get_adapter(session, tenant_id, adapter) is None:
        raise UnknownAdapter(f"adapter: adapter {adapter!r} not found (POST /v1/adapters registers one)",
                             field="adapter")
    return adapter, {"adapter_scale": 1.0 if scale is None else float(scale)}


def _with_adapter(spec: JobSpec, adapter_id: str | None, extra: dict[str, float]) -> JobSpec:
    return replace(spec, adapter_id=adapter_id, params={**spec.params, **extra}) if adapter_id else spec


def with_request_hashes(session: Session, tenant_id: str, specs: list[JobSpec],
                        owned: dict[str, File]) -> list[JobSpec]:
    """The specs with the request hash of those an identical job may answer (``worker.dedupe``):
    a seed given, the tenant not opted out, not a re-run."""
    if not any(spec.seed_given for spec in specs):
        return specs
    tenant = session.get(Tenant, tenant_id)
    enabled = tenant is not None and tenant.dedupe
    adapters: dict[str, str] = {}
    out = []
    for spec in specs:
        if not dedupe.qualifies(seed_given=spec.seed_given, tenant_dedupe=enabled, rerun=spec.rerun_of is not None):
            out.append(spec)
            continue
        if spec.adapter_id is not None and spec.adapter_id not in adapters:
            row = queries.get_adapter(session, tenant_id, spec.adapter_id)
            adapters[spec.adapter_id] = f"{spec.adapter_id}:{row.sha256 if row else ''}"
        digest = dedupe.request_hash(
            task=spec.task, prompt=spec.prompt, input_sha256s=[owned[fid].sha256 for fid in spec.input_file_ids],
            params=spec.params, think=spec.think, width=spec.width, height=spec.height,
            adapter_sha256=adapters.get(spec.adapter_id) if spec.adapter_id else None)
        out.append(replace(spec, request_hash=digest))
    return out


def _check_file_ids(file_ids: Sequence[str], field: str) -> None:
    """Ids are looked up in the database, which cannot take a NUL: refuse control characters first."""
    for i, file_id in enumerate(file_ids):
        params.check_text(file_id, f"{field}[{i}]", allow_whitespace=False)


def job_spec(session: Session, settings: Settings, tenant_id: str, body: JobIn) -> JobSpec:
    _check_file_ids(body.input_file_ids, "input_file_ids")
    owned = queries.files_by_ids(session, tenant_id, body.input_file_ids)
    spec = _spec(settings, owned, task=body.task, prompt=body.prompt, file_ids=body.input_file_ids,
                 think=body.think, width=body.width, height=body.height, seed=body.seed,
                 user_params=params_dict(body.params), metadata=body.metadata, gate=body.quality_gate)
    spec = _with_adapter(spec, *adapter_choice(session, tenant_id, body.adapter, body.adapter_scale))
    return with_request_hashes(session, tenant_id, [spec], owned)[0]


def batch_specs(session: Session, settings: Settings, tenant_id: str, body: BatchIn) -> list[JobSpec]:
    if len(body.items) > settings.max_batch_items:
        raise BatchTooLarge(f"items: {len(body.items)} items exceeds the {settings.max_batch_items} item limit",
                            field="items")
    for i, item in enumerate(body.items):
        _check_file_ids(item.input_file_ids or [], f"items[{i}].input_file_ids")
    if body.product_file:
        params.check_text(body.product_file, "product_file", allow_whitespace=False)
    wanted = {fid for item in body.items for fid in (item.input_file_ids or [])}
    if body.product_file:
        wanted.add(body.product_file)
    owned = queries.files_by_ids(session, tenant_id, wanted)
    if body.product_file and body.product_file not in owned:
        raise UnknownFile(f"product_file: file {body.product_file!r} not found", field="product_file")
    specs = []
    for i, item in enumerate(body.items):
        task = item.task or body.task
        if task is None:
            raise InvalidParameter(f"items[{i}].task: required when the batch sets no task", field=f"items[{i}].task")
        file_ids = item.input_file_ids if item.input_file_ids is not None else (
            [body.product_file] if body.product_file else [])
        with located(f"items[{i}]"):
            specs.append(_spec(
                settings, owned, task=task, prompt=item.prompt, file_ids=file_ids,
                think=body.think if item.think is None else item.think,
                width=item.width if item.width is not None else (body.width if task == "generate" else None),
                height=item.height if item.height is not None else (body.height if task == "generate" else None),
                seed=item.seed, user_params=params_dict(body.params, item.params), metadata=item.metadata,
                gate=item.quality_gate or body.quality_gate))
    adapter_id, extra = adapter_choice(session, tenant_id, body.adapter, body.adapter_scale)
    return with_request_hashes(session, tenant_id, [_with_adapter(spec, adapter_id, extra) for spec in specs], owned)


def rerun_spec(session: Session, settings: Settings, tenant_id: str, job: Job,
               overrides: dict[str, Any]) -> JobSpec:
    """The same request as ``job`` — task, prompt, input pictures, think, size, adapter and scale,
    metadata and every resolved parameter, its seed among them — with ``overrides`` (a few
    parameters) on top, checked again as a new submission is: the input files must still be the
    tenant's, the adapter still registered."""
    owned = queries.files_by_ids(session, tenant_id, job.input_file_ids)
    user_params = {name: value for name, value in job.params.items() if name in params.LIMITS}
    sized = job.task == "generate"  # an edit's size follows from its input picture again
    spec = _spec(settings, owned, task=job.task, prompt=job.prompt, file_ids=list(job.input_file_ids),
                 think=job.think, width=job.width if sized else None, height=job.height if sized else None,
                 seed=None, user_params={**user_params, **overrides}, metadata=job.meta,
                 gate=job.params.get("quality_gate"))
    scale = job.params.get("adapter_scale")
    if scale is not None and job.adapter_id is None:
        raise UnknownAdapter(f"adapter: the adapter job {job.id!r} ran with was deleted", field="adapter")
    return replace(_with_adapter(spec, *adapter_choice(session, tenant_id, job.adapter_id, scale)), rerun_of=job.id)


def check_webhook(settings: Settings, url: str | None) -> str | None:
    """The URL's form only: its host is resolved and checked at each delivery attempt."""
    return webhook_targets.check_webhook_url(url, allow_private=settings.webhook_allow_private)


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    return params.check_metadata(metadata)


def parse_cancel_after(value: str) -> int:
    """Seconds of a ``Cancel-After`` header (in the style of Replicate's): plain seconds
    (``300``) or whole units (``90s``, ``5m``, ``1h``, ``1h30m``, ``2d``); 1 s..30 days."""
    text = value.strip().lower()
    if _SECONDS.fullmatch(text):
        seconds = int(text)
    elif text and _DURATION_PART.sub("", text) == "":
        seconds = sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))
    else:
        raise InvalidParameter(f"{CANCEL_AFTER_FIELD}: {value[:40]!r} is not a duration like 90s, 5m, 1h "
                               "or plain seconds", field=CANCEL_AFTER_FIELD)
    if not 1 <= seconds <= MAX_DEADLINE_S:
        raise InvalidParameter(f"{CANCEL_AFTER_FIELD}: {value.strip()!r} is {seconds} s, outside "
                               f"1..{MAX_DEADLINE_S} s (30 days)", field=CANCEL_AFTER_FIELD)
    return seconds


def deadline_at(deadline_s: int | None, cancel_after: str | None, now: datetime) -> datetime | None:
    """``now`` plus the smaller of the body's ``deadline_s`` and the ``Cancel-After`` header;
    None when neither is given. The body's range is checked by its schema."""
    given = [s for s in (deadline_s, parse_cancel_after(cancel_after) if cancel_after is not None else None)
             if s is not None]
    return now + timedelta(seconds=min(given)) if given else None


def fingerprint_payload(body: JobIn | BatchIn, cancel_after: str | None) -> dict[str, Any]:
    """What an ``Idempotency-Key`` is bound to: the body, and the deadline header when given."""
    payload = body.model_dump(mode="json")
    if cancel_after is not None:
        payload[CANCEL_AFTER_FIELD] = cancel_after
    return payload
