"""Request and response bodies of the API (pydantic), with their limits declared on the fields
so a 422 names the field and the limit, and the OpenAPI docs show them.

Owns: the wire format. Ranges of hyper-parameters come from ``worker.params.LIMITS`` (one
source of truth; ``worker.params.resolve`` checks again and fills per-task defaults). Limits
that are settings (batch size, output side) are checked in the routes, which know the settings.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.models import DeliveryStatus, Priority
from worker.params import LIMITS, MAX_PROMPT_CHARS, SEED_MAX
from worker.webhook_targets import MAX_URL_CHARS

Task = Literal["generate", "edit", "understand", "tryon"]
RenormType = Literal["global", "channel", "text_channel"]
HARD_MAX_ITEMS = 100_000  # parsing bound; the real limit is the max_batch_items setting
MAX_INPUT_FILES = 4
ID = Field(min_length=1, max_length=64)
MAX_DEADLINE_S = 30 * 86400  # 30 days: a deadline (``deadline_s``, ``Cancel-After``) is 1 s..30 days


def _priority() -> Any:
    return Field(Priority.batch, description="interactive: dispatched ahead of the tenant's batch work")


def _deadline() -> Any:
    return Field(None, ge=1, le=MAX_DEADLINE_S, description="seconds from submission after which a job that "
                 "has not finished expires (as does the Cancel-After header; the smaller wins)")


def _num(name: str, **extra: Any) -> Any:
    rng = LIMITS[name]
    bounds = {"gt" if rng.low_open else "ge": rng.low, "le": rng.high}
    return Field(None, **bounds, **extra)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationParamsIn(Strict):
    """BAGEL hyper-parameters; anything left out takes the task's default."""

    cfg_text_scale: float | None = _num("cfg_text_scale", description="text CFG scale")
    cfg_img_scale: float | None = _num("cfg_img_scale", description="image CFG scale (edit/try-on)")
    cfg_interval: tuple[float, float] | None = Field(None, description="[start, end] of the CFG window in 0..1")
    timestep_shift: float | None = _num("timestep_shift")
    num_timesteps: int | None = _num("num_timesteps", description="denoising steps")
    cfg_renorm_min: float | None = _num("cfg_renorm_min")
    cfg_renorm_type: RenormType | None = None
    max_think_tokens: int | None = _num("max_think_tokens")
    max_new_tokens: int | None = _num("max_new_tokens", description="answer length (understand)")
    do_sample: bool | None = None
    text_temperature: float | None = _num("text_temperature")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    taylorseer: bool | None = Field(None, description="TaylorSeer step caching (generate/edit/try-on): "
                                    "predicts most denoising steps from the computed ones — faster, an "
                                    "approximation; off by default, as in the reference")


class JobIn(Strict):
    """One job. ``tryon``: an edit of the product image (``input_file_ids[0]``) into the scene
    described by ``prompt``, with defaults tuned to keep the product as it is."""

    task: Task
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    input_file_ids: list[str] = Field(default_factory=list, max_length=MAX_INPUT_FILES)
    think: bool = False
    width: int | None = Field(None, ge=16, description="generate only; multiple of 16")
    height: int | None = Field(None, ge=16, description="generate only; multiple of 16")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="shorthand for params.seed")
    params: GenerationParamsIn | None = None
    webhook_url: str | None = Field(None, max_length=MAX_URL_CHARS)
    metadata: dict[str, Any] | None = None
    priority: Priority = _priority()
    deadline_s: int | None = _deadline()


class BatchItemIn(Strict):
    """One item of a batch; unset fields take the batch's values."""

    task: Task | None = None
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    input_file_ids: list[str] | None = Field(None, max_length=MAX_INPUT_FILES)
    think: bool | None = None
    width: int | None = Field(None, ge=16)
    height: int | None = Field(None, ge=16)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    params: GenerationParamsIn | None = None
    metadata: dict[str, Any] | None = None


class BatchIn(Strict):
    """Many jobs at once. Try-on form: ``{"task": "tryon", "product_file": id, "items":
    [{"prompt": scene, "seed": 1}, …]}``; general form: per-item ``task`` and ``input_file_ids``."""

    task: Task | None = None
    product_file: str | None = Field(None, min_length=1, max_length=64,
                                     description="input image shared by every item (try-on: the product)")
    items: list[BatchItemIn] = Field(min_length=1, max_length=HARD_MAX_ITEMS)
    think: bool = False
    width: int | None = Field(None, ge=16)
    height: int | None = Field(None, ge=16)
    params: GenerationParamsIn | None = Field(None, description="defaults for every item")
    webhook_url: str | None = Field(None, max_length=MAX_URL_CHARS)
    metadata: dict[str, Any] | None = None
    priority: Priority = _priority()
    deadline_s: int | None = _deadline()


class FileOut(BaseModel):
    id: str
    sha256: str
    content_type: str
    format: str
    width: int
    height: int
    size_bytes: int
    filename: str | None
    created_at: datetime


class ErrorInfo(BaseModel):
    code: str
    message: str | None


class Progress(BaseModel):
    step: int
    total: int


class Timings(BaseModel):
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model_seconds: float | None = Field(None, description="its share of the engine call it ran in")
    gpu_seconds: float | None = Field(None, description="the job's share of its chunks' GPU time (all attempts)")
    phases: dict[str, float] = Field(default_factory=dict, description="seconds per phase: queue, input, encode, "
                                     "prefill, think, denoise, decode, upload (engine phases: the whole chunk's)")


class QueueOut(BaseModel):
    """Where an active job or batch stands (see README "Scheduling")."""

    position: int = Field(description="jobs of all tenants dispatched before it (0: next or running)")
    tenant_position: int = Field(description="the tenant's own jobs dispatched before it")
    eta_s: float | None = Field(description="expected seconds until it finishes; null while no GPU worker is live")
    eta_at: datetime | None
    live_workers: int


class Result(BaseModel):
    url: str | None = Field(None, description="presigned S3 URL or signed API download URL")
    url_expires_at: datetime | None = None
    content_type: str | None = None
    text: str | None = Field(None, description="answer (understand)")
    think_text: str | None = None
    expired: bool = False


class JobOut(BaseModel):
    id: str
    batch_id: str | None
    position: int
    task: str
    status: str
    prompt: str
    input_file_ids: list[str]
    think: bool
    width: int | None
    height: int | None
    params: dict[str, Any]
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: ErrorInfo | None
    progress: Progress
    timings: Timings
    result: Result | None
    metadata: dict[str, Any]
    webhook_url: str | None
    created_at: datetime
    priority: Priority
    deadline_at: datetime | None
    queue: QueueOut | None = Field(None, description="position and ETA while queued or running")


class BatchOut(BaseModel):
    id: str
    status: Literal["active", "completed"]
    job_count: int
    counts: dict[str, int]
    progress: float = Field(description="0..1: finished jobs plus running jobs' step fraction")
    cancel_requested: bool
    webhook_url: str | None
    metadata: dict[str, Any]
    created_at: datetime
    completed_at: datetime | None
    job_ids: list[str] | None = Field(None, description="in item order; returned on creation")
    priority: Priority
    deadline_at: datetime | None
    gpu_seconds: float = Field(0.0, description="GPU-seconds of its jobs so far")
    queue: QueueOut | None = Field(None, description="first active job's position, last job's ETA")


class JobPage(BaseModel):
    items: list[JobOut]
    page: int
    page_size: int
    total: int
    next_page: int | None


class JobList(BaseModel):
    data: list[JobOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class BatchList(BaseModel):
    data: list[BatchOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class UsageDay(BaseModel):
    date: date
    task: str
    jobs: int = Field(description="jobs finished that UTC day, any final status")
    images: int = Field(description="succeeded jobs that made an image (every task but understand)")
    gpu_seconds: float


class UsageTotals(BaseModel):
    jobs: int
    images: int
    gpu_seconds: float


class Usage(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: date = Field(alias="from")
    to: date
    days: list[UsageDay]
    totals: UsageTotals


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


class WebhookTestIn(Strict):
    url: str = Field(min_length=1, max_length=MAX_URL_CHARS, description="where to send a signed `webhook.test` "
                     "ping; checked like a job's webhook_url")


class DeliveryAttemptOut(BaseModel):
    attempt: int = Field(description="1 for the first send; retries and replays continue the count")
    at: datetime = Field(description="when the attempt ended")
    status_code: int | None = Field(description="the receiver's HTTP status; null when no response came")
    latency_ms: float = Field(description="resolving, connecting, sending and the response, in milliseconds")
    error: str | None = Field(description="null when delivered; else e.g. `HTTP 503`, `address_not_allowed: …`, "
                              "`dns_error: …`, `ConnectError: …`")
    address: str | None = Field(description="the checked IP address it connected to; null when it got no "
                                "further than DNS or the address policy")


class DeliveryOut(BaseModel):
    id: str = Field(description="the `webhook-id` header of every attempt and replay")
    event: str
    url: str
    status: DeliveryStatus = Field(description="pending (an attempt is due), delivered (the last attempt got a "
                                   "2xx) or failed (given up: retry window over, or a permanent error)")
    job_id: str | None
    batch_id: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    replayed_at: datetime | None = Field(description="the last replay asked for; the retry window counts from it")
    attempts: list[DeliveryAttemptOut] = Field(description="oldest first")
    payload: dict[str, Any] | None = Field(None, description="the event body as stored (result URLs are minted at "
                                           "each send); only on GET /v1/webhooks/deliveries/{id}, replay and test")


class DeliveryList(BaseModel):
    data: list[DeliveryOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class ManifestEntry(BaseModel):
    """One job of a batch manifest: the ``batch.completed`` manifest's fields (job_id, position,
    status, output_key, error_code, output_url), then the rest; also the CSV's columns, in order."""

    job_id: str
    position: int
    status: str
    output_key: str | None
    error_code: str | None = Field(description="failed or expired jobs only")
    output_url: str | None = Field(description="succeeded jobs: presigned S3 URL or signed API download URL; "
                                   "null once the result expired")
    output_url_expires_at: datetime | None
    error_message: str | None
    task: str
    prompt: str
    think: bool = Field(description="whether it was asked to reason before answering")
    think_text: str | None
    output_text: str | None = Field(description="answer (understand)")
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model_seconds: float | None
    gpu_seconds: float | None
    seq: int | None = Field(description="the batch report that first counted it final (see `since`); null until "
                            "one did")


class Manifest(BaseModel):
    """A batch's jobs in position order with its counts: valid at any time, final once completed."""

    batch_id: str
    status: Literal["active", "completed"]
    completed_at: datetime | None
    counts: dict[str, int]
    done: int = Field(description="jobs in a final status: succeeded, failed, canceled or expired")
    total: int
    seq: int = Field(description="the batch's last report (batch.progress events, then batch.completed); "
                     "pass it as ?since= next time to get only the jobs later reports count final")
    metadata: dict[str, Any]
    jobs: list[ManifestEntry]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")
