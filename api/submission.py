"""From validated request bodies to job specs, and publishing after the commit.

Owns: the edge checks that need the database or the settings — input files the tenant owns,
image counts per task, batch size, output size, webhook URL policy — and the merge of batch
defaults into items; then, once the jobs are committed, one broker message per chunk. Leaves
the per-parameter rules to ``worker.params`` and the state change to ``worker.jobs``.

Every error is raised before anything is stored or enqueued; its field is the full path in the
body (``items[3].params.num_timesteps``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from api.schemas import BatchIn, GenerationParamsIn, JobIn
from worker import dispatch, jobs, params
from worker.errors import BatchTooLarge, BrokerUnavailable, InvalidInput, InvalidParameter, UnknownFile
from worker.jobs import JobSpec
from worker.settings import Settings

log = logging.getLogger(__name__)


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


def _params_dict(*layers: GenerationParamsIn | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            out.update(layer.model_dump(exclude_none=True))
    if "cfg_interval" in out:
        out["cfg_interval"] = list(out["cfg_interval"])
    return out


def _spec(settings: Settings, owned: set[str], *, task: str, prompt: str, file_ids: Sequence[str],
          think: bool, width: int | None, height: int | None, seed: int | None, user_params: dict[str, Any],
          metadata: dict[str, Any] | None) -> JobSpec:
    params.check_task(task)
    params.check_prompt(prompt)
    params.check_input_count(task, len(file_ids))
    for i, file_id in enumerate(file_ids):
        if file_id not in owned:
            raise UnknownFile(f"input_file_ids[{i}]: file {file_id!r} not found", field=f"input_file_ids[{i}]")
    if seed is not None:
        user_params["seed"] = seed
    resolved = params.resolve(task, user_params, think)
    out_w, out_h = params.resolve_size(task, width, height, max_side_px=settings.max_output_side_px)
    return JobSpec(task=task, prompt=prompt, params=resolved, input_file_ids=tuple(file_ids), think=think,
                   width=out_w, height=out_h, metadata=params.check_metadata(metadata))


def _check_file_ids(file_ids: Sequence[str], field: str) -> None:
    """Ids are looked up in the database, which cannot take a NUL: refuse control characters first."""
    for i, file_id in enumerate(file_ids):
        params.check_text(file_id, f"{field}[{i}]", allow_whitespace=False)


def job_spec(session: Session, settings: Settings, tenant_id: str, body: JobIn) -> JobSpec:
    _check_file_ids(body.input_file_ids, "input_file_ids")
    owned = set(jobs.files_by_ids(session, tenant_id, body.input_file_ids))
    return _spec(settings, owned, task=body.task, prompt=body.prompt, file_ids=body.input_file_ids,
                 think=body.think, width=body.width, height=body.height, seed=body.seed,
                 user_params=_params_dict(body.params), metadata=body.metadata)


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
    owned = set(jobs.files_by_ids(session, tenant_id, wanted))
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
                seed=item.seed, user_params=_params_dict(body.params, item.params), metadata=item.metadata))
    return specs


def check_webhook(settings: Settings, url: str | None) -> str | None:
    return params.check_webhook_url(url, allow_private=settings.webhook_allow_private)


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    return params.check_metadata(metadata)


def publish(settings: Settings, session: Session, chunk_ids: list[str]) -> None:
    """After the commit: one message per chunk, then record it. A broker outage is logged and
    left to the reconciler (the jobs are safely queued in the database)."""
    try:
        dispatch.publish_chunks(settings, chunk_ids)
    except BrokerUnavailable as exc:
        log.warning("%d chunk(s) stay queued for the reconciler: %s", len(chunk_ids), exc.message)
        return
    jobs.mark_published(session, chunk_ids)
