"""What each SDK method sends, without sending it: the requests shared by ``Client`` and
``AsyncClient``, so the two differ only in how they wait for I/O.

Owns: the endpoint paths, the request bodies (fields left as None are not sent, so the
service's defaults apply; a quality gate, a ``QualityGate`` or a dict, is sent as its object),
reading an upload's bytes (an image, or a LoRA adapter's two PEFT files), a session's opening
parts in their wire form, a fresh ``Idempotency-Key`` (uuid4) for every creating call the API
deduplicates unless the caller gives one, the API's address and key (arguments or environment),
and where a download is written.
Leaves retries to ``bagel_client.retries``, ``wait``'s schedule to ``bagel_client.waiting`` and
the answers' shapes to ``bagel_client.models``.
"""

from __future__ import annotations

import mimetypes
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeAlias
from urllib.parse import quote

from bagel_client.errors import ResultUnavailable
from bagel_client.models import (
    Adapter,
    Batch,
    BatchItem,
    File,
    GenerationParams,
    Job,
    Priority,
    QualityGate,
    QualityGateParams,
    Session,
    SessionPart,
    Task,
    TurnTask,
)

UploadSource: TypeAlias = "str | os.PathLike[str] | bytes | IO[bytes]"
# A LoRA adapter: the folder PEFT's save_pretrained wrote, or its (config, weights) files.
AdapterSource: TypeAlias = "str | os.PathLike[str] | tuple[UploadSource, UploadSource]"
QualityGateSource: TypeAlias = "QualityGate | QualityGateParams | Mapping[str, Any]"
# A session's opening part: a text, an uploaded File, or its wire form ({"text": ...} or {"file_id": ...}).
SessionPartSource: TypeAlias = "str | File | SessionPart"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
USER_AGENT = "bagel-client (httpx)"
API_URL_ENV = "BAGEL_API_URL"
API_KEY_ENV = "BAGEL_API_KEY"
LIST_PAGE_SIZE = 50
BATCH_JOBS_PAGE_SIZE = 200
# A result URL that expires within this margin is minted again before the download starts.
URL_MARGIN_S = 30.0
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


@dataclass(frozen=True)
class Call:
    """One request: method, path (relative to the API) or absolute URL, query, JSON or
    multipart body (``files`` and its form fields, ``data``), and the idempotency key of a
    creating call. ``authenticated`` False: the URL is its own credential (a result download),
    so no API key goes with it."""

    method: str
    url: str
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None
    idempotency_key: str | None = None
    authenticated: bool = True

    def headers(self, api_key: str) -> dict[str, str]:
        headers = {"authorization": f"Bearer {api_key}"} if self.authenticated else {}
        if self.idempotency_key is not None:
            headers["idempotency-key"] = self.idempotency_key
        return headers

    @property
    def what(self) -> str:
        """How log lines name it: ``POST /v1/batches`` (a download without its signature)."""
        return f"{self.method} {self.url.split('?', 1)[0]}"


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _key(idempotency_key: str | None) -> str:
    return idempotency_key if idempotency_key is not None else str(uuid.uuid4())


def id_of(target: str | File | Job | Batch | Adapter | Session) -> str:
    return target if isinstance(target, str) else target.id


def quality_gate_body(gate: QualityGateSource | None) -> dict[str, Any] | None:
    """The ``quality_gate`` object of a request: a ``QualityGate``'s fields, or the dict as given
    (keys it leaves out take the service's defaults; the API checks names and ranges)."""
    if gate is None:
        return None
    if isinstance(gate, QualityGate):
        return {"threshold": gate.threshold, "max_regenerations": gate.max_regenerations}
    return dict(gate)


def _item_body(item: BatchItem) -> dict[str, Any]:
    body: dict[str, Any] = dict(item)
    if body.get("quality_gate") is not None:
        body["quality_gate"] = quality_gate_body(body["quality_gate"])
    return body


def read_upload(source: UploadSource, filename: str | None) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of an upload: a path, bytes or a binary file object.
    The service checks the content itself (PNG, JPEG or WebP); the type sent is a hint."""
    if isinstance(source, bytes):
        data, name = source, filename or "upload"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        data, name = path.read_bytes(), filename or path.name
    else:
        data = source.read()
        name = filename or Path(str(getattr(source, "name", "upload"))).name
    content_type = next((t for magic, t in _MAGIC if data.startswith(magic)), None)
    if content_type is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        content_type = "image/webp"
    return name, data, content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"


def upload(source: UploadSource, filename: str | None, idempotency_key: str | None) -> Call:
    return Call("POST", "/v1/files", files={"file": read_upload(source, filename)},
                idempotency_key=_key(idempotency_key))


def upload_adapter(name: str, source: AdapterSource, idempotency_key: str | None = None) -> Call:
    """The multipart POST of a LoRA adapter: ``source`` is the folder PEFT's ``save_pretrained``
    wrote (``adapter_config.json`` and ``adapter_model.safetensors``) or a ``(config, weights)``
    pair of paths, bytes or binary file objects. With an ``Idempotency-Key`` (a new one unless
    given), so a retry whose first send did land gets the stored adapter back."""
    if isinstance(source, tuple):
        config, weights = source
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"adapter: {folder} is not a folder (give the folder PEFT's save_pretrained wrote, "
                             "or a (config, weights) pair)")
        missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"adapter: {folder} has no {' and no '.join(missing)}")
        config, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    return Call("POST", "/v1/adapters", data={"name": name}, files={
        "config": read_upload(config, ADAPTER_CONFIG), "weights": read_upload(weights, ADAPTER_WEIGHTS)},
        idempotency_key=_key(idempotency_key))


def submit_job(task: Task, prompt: str, *, input_files: Sequence[str | File], think: bool, width: int | None,
               height: int | None, seed: int | None, params: GenerationParams | None,
               adapter: str | Adapter | None, adapter_scale: float | None,
               quality_gate: QualityGateSource | None, webhook_url: str | None,
               metadata: Mapping[str, Any] | None, priority: Priority | None, deadline_s: int | None,
               idempotency_key: str | None) -> Call:
    body = _drop_none({"task": task, "prompt": prompt, "input_file_ids": [id_of(f) for f in input_files] or None,
                       "think": think or None, "width": width, "height": height, "seed": seed,
                       "params": dict(params) if params else None,
                       "adapter": None if adapter is None else id_of(adapter), "adapter_scale": adapter_scale,
                       "quality_gate": quality_gate_body(quality_gate), "webhook_url": webhook_url,
                       "metadata": dict(metadata) if metadata is not None else None, "priority": priority,
                       "deadline_s": deadline_s})
    return Call("POST", "/v1/jobs", json=body, idempotency_key=_key(idempotency_key))


def submit_batch(items: Sequence[BatchItem], *, task: Task | None, product_file: str | File | None,
                 think: bool | None, width: int | None, height: int | None, params: GenerationParams | None,
                 adapter: str | Adapter | None, adapter_scale: float | None,
                 quality_gate: QualityGateSource | None, webhook_url: str | None,
                 metadata: Mapping[str, Any] | None, priority: Priority | None, deadline_s: int | None,
                 idempotency_key: str | None) -> Call:
    body = _drop_none({"task": task, "product_file": None if product_file is None else id_of(product_file),
                       "items": [_item_body(item) for item in items], "think": think, "width": width,
                       "height": height, "params": dict(params) if params else None,
                       "adapter": None if adapter is None else id_of(adapter), "adapter_scale": adapter_scale,
                       "quality_gate": quality_gate_body(quality_gate), "webhook_url": webhook_url,
                       "metadata": dict(metadata) if metadata is not None else None, "priority": priority,
                       "deadline_s": deadline_s})
    return Call("POST", "/v1/batches", json=body, idempotency_key=_key(idempotency_key))


def session_part(part: SessionPartSource) -> dict[str, str]:
    """An opening part's wire form: a string is a text, a ``File`` a picture; a ``SessionPart``
    dict is sent as given (the API refuses one with both or neither key)."""
    if isinstance(part, str):
        return {"text": part}
    if isinstance(part, File):
        return {"file_id": part.id}
    return dict(part)


def create_session(system_prompt: str | None, parts: Sequence[SessionPartSource],
                   metadata: Mapping[str, Any] | None) -> Call:
    """No ``Idempotency-Key``: the API does not deduplicate session creation (see
    ``bagel_client.retries``)."""
    body = _drop_none({"system_prompt": system_prompt, "parts": [session_part(p) for p in parts] or None,
                       "metadata": dict(metadata) if metadata is not None else None})
    return Call("POST", "/v1/sessions", json=body)


def session_path(session: str | Session) -> str:
    return f"/v1/sessions/{quote(id_of(session), safe='')}"


def add_turn(session: str | Session, task: TurnTask, prompt: str, *, input_files: Sequence[str | File], think: bool,
             seed: int | None, params: GenerationParams | None, width: int | None, height: int | None,
             webhook_url: str | None, metadata: Mapping[str, Any] | None, idempotency_key: str | None) -> Call:
    body = _drop_none({"task": task, "prompt": prompt, "input_file_ids": [id_of(f) for f in input_files] or None,
                       "think": think or None, "seed": seed, "params": dict(params) if params else None,
                       "width": width, "height": height, "webhook_url": webhook_url,
                       "metadata": dict(metadata) if metadata is not None else None})
    return Call("POST", f"{session_path(session)}/turns", json=body, idempotency_key=_key(idempotency_key))


def tryon_items(prompts: Sequence[str | BatchItem], seed: int | None) -> list[BatchItem]:
    """Batch items from scene prompts (or items); ``seed`` given: item ``i`` gets ``seed + i``
    unless it names its own."""
    if not prompts:
        raise ValueError("prompts: at least one prompt is needed")
    items: list[BatchItem] = []
    for i, prompt in enumerate(prompts):
        item: BatchItem = {"prompt": prompt} if isinstance(prompt, str) else BatchItem(**prompt)
        if seed is not None and "seed" not in item:
            item["seed"] = seed + i
        items.append(item)
    return items


def get(path: str, params: Mapping[str, Any] | None = None) -> Call:
    return Call("GET", path, params=_drop_none(params or {}) or None)


def file_path(file_id: str) -> str:
    return f"/v1/files/{quote(file_id, safe='')}"


def job_path(job: str | Job) -> str:
    return f"/v1/jobs/{quote(id_of(job), safe='')}"


def batch_path(batch: str | Batch) -> str:
    return f"/v1/batches/{quote(id_of(batch), safe='')}"


def adapter_path(adapter: str | Adapter) -> str:
    return f"/v1/adapters/{quote(id_of(adapter), safe='')}"


def rerun(job: str | Job, *, seed: int | None, num_timesteps: int | None, cfg_text_scale: float | None,
          cfg_img_scale: float | None, idempotency_key: str | None) -> Call:
    """The job's request again as a new job; only the overrides given are sent."""
    body = _drop_none({"seed": seed, "num_timesteps": num_timesteps, "cfg_text_scale": cfg_text_scale,
                       "cfg_img_scale": cfg_img_scale})
    return Call("POST", f"{job_path(job)}/rerun", json=body, idempotency_key=_key(idempotency_key))


def delivery_path(delivery_id: str) -> str:
    return f"/v1/webhooks/deliveries/{quote(delivery_id, safe='')}"


def replay_delivery(delivery_id: str, idempotency_key: str | None) -> Call:
    return Call("POST", f"{delivery_path(delivery_id)}/replay", idempotency_key=_key(idempotency_key))


def share_batch(batch: str | Batch, expires_in_s: int | None) -> Call:
    """No ``Idempotency-Key``: a share link is signed, not stored, so a retry only mints another."""
    return Call("POST", f"{batch_path(batch)}/share", json=_drop_none({"expires_in_s": expires_in_s}))


def webhook_ping(url: str, idempotency_key: str | None) -> Call:
    return Call("POST", "/v1/webhooks/test", json={"url": url}, idempotency_key=_key(idempotency_key))


def list_params(created_after: datetime | None, created_before: datetime | None, page_size: int,
                **filters: Any) -> dict[str, Any]:
    return _drop_none({**filters, "limit": page_size,
                       "created_after": None if created_after is None else created_after.isoformat(),
                       "created_before": None if created_before is None else created_before.isoformat()})


def download(job: Job, *, fresh: bool) -> Call | None:
    """The GET of a job's image. None when its URL is missing or about to expire and ``job``
    is not ``fresh`` from the API (read it again for a new URL); raises ``ResultUnavailable``
    when it has no image to give."""
    result = job.result
    if job.status != "succeeded" or result is None:
        raise ResultUnavailable(f"job {job.id}: status {job.status}, no result to download")
    if result.expired:
        raise ResultUnavailable(f"job {job.id}: the stored result expired and was deleted")
    if result.url is None:
        if result.text is not None or fresh:
            raise ResultUnavailable(f"job {job.id}: no image to download (a text answer is in result.text)")
        return None
    expires = result.url_expires_at
    if not fresh and expires is not None and expires - datetime.now(UTC) < timedelta(seconds=URL_MARGIN_S):
        return None
    return Call("GET", result.url, authenticated=False)


def write_atomically(dest: Path, data: bytes) -> Path:
    """Write ``data`` to ``dest`` through a temporary file in the same folder, so a reader never
    sees half an image."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest


def download_path(job: Job, dest: str | os.PathLike[str]) -> Path:
    """``dest`` itself, or ``dest/<job id>.png`` when ``dest`` is an existing folder."""
    path = Path(dest)
    return path / f"{job.id}.png" if path.is_dir() else path


def credentials(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    """The API's base URL and key: the arguments, else ``BAGEL_API_URL`` and ``BAGEL_API_KEY``."""
    base_url = base_url or os.environ.get(API_URL_ENV)
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if not base_url:
        raise ValueError(f"base_url: not given and {API_URL_ENV} is not set (e.g. http://127.0.0.1:8000)")
    if not api_key:
        raise ValueError(f"api_key: not given and {API_KEY_ENV} is not set (a bj_… key: `bagel-jobs tenant create`)")
    return base_url.rstrip("/"), api_key
