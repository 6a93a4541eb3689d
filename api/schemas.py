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

from api.contract import ID_PATTERN, PROMPT_PATTERN
from api.quality_schemas import (
    DEDUPE_OF_TEXT,
    DEDUPE_TEXT,
    Dedupe,
    QualityGateIn,
    QualityOut,
)
from worker.models import DeliveryStatus, JobStatus, Priority
from worker.params import LIMITS, MAX_PROMPT_CHARS, SEED_MAX
from worker.webhook_targets import MAX_URL_CHARS

__all__ = ["JobStatus"]  # re-exported: the response models' status enum

Task = Literal["generate", "edit", "understand", "tryon"]
RenormType = Literal["global", "channel", "text_channel"]
BatchStatus = Literal["active", "completed"]
Day = date  # a field named ``date`` cannot be annotated ``date`` and have a default
Event = Literal["job.succeeded", "job.failed", "job.expired", "batch.progress", "batch.completed", "webhook.test"]
HARD_MAX_ITEMS = 100_000  # parsing bound; the real limit is the max_batch_items setting
MAX_INPUT_FILES = 4
TASK_TEXT = ("generate (text to image), edit (an image and an instruction), understand (images and a question; "
             "answers in text) or tryon (the product image placed into the scene the prompt describes)")
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\u0000-\u0020]+$"
# What each task takes as input images (``worker.params.INPUT_IMAGES``), as JSON Schema conditions.
INPUT_RULES = [{"if": {"properties": {"task": {"const": task}}, "required": ["task"]},
                "then": {"properties": {"input_file_ids": {"minItems": low, "maxItems": high}},
                         **({"required": ["input_file_ids"]} if low else {})}}
               for task, (low, high) in {"generate": (0, 0), "edit": (1, 1), "tryon": (1, 1),
                                         "understand": (1, 4)}.items()]
MAX_DEADLINE_S = 30 * 86400  # 30 days: a deadline (``deadline_s``, ``Cancel-After``) is 1 s..30 days


def _priority() -> Any:
    return Field(Priority.batch, description="interactive: dispatched ahead of the tenant's batch work; batch "
                 "(default): fair-shared with other tenants")


def _prompt() -> Any:
    return Field(min_length=1, max_length=MAX_PROMPT_CHARS, json_schema_extra={"pattern": PROMPT_PATTERN},
                 description="the instruction, scene or question; not blank; tab, newline and CR are the only "
                 "control characters allowed", examples=["the mug on a sunlit wooden breakfast table"])


def _file_ids(**default: Any) -> Any:
    return Field(**default, max_length=MAX_INPUT_FILES, description="ids from POST /v1/files: generate takes none, "
                 "edit and tryon one, understand 1 to 4",
                 json_schema_extra={"items": {"type": "string", "minLength": 1, "pattern": ID_PATTERN}})


def _side(name: str, rule: str) -> Any:
    return Field(None, ge=16, json_schema_extra={"multipleOf": 16}, description=f"output {name} in px, a multiple of 16 up to the "
                 f"max_output_side_px setting; {rule}", examples=[512])


MAX_ADAPTER_SCALE = 4.0


def _adapter() -> Any:
    return Field(None, min_length=1, max_length=64, json_schema_extra={"pattern": ID_PATTERN},
                 description="a LoRA adapter of this tenant (POST /v1/adapters) to run with, by id; null: the base "
                 "model", examples=["3d9c2a1e-5b7f-4e8d-9a6c-1f2e3d4c5b6a"])


def _adapter_scale() -> Any:
    return Field(None, ge=0.0, le=MAX_ADAPTER_SCALE, description="how strongly the adapter applies (its "
                 "B·A is scaled by this on top of alpha/r); default 1.0; only with adapter", examples=[1.0])


def _quality_gate(what: str) -> Any:
    return Field(None, description=f"opt in to the quality gate for {what} (generate, edit and tryon): BAGEL judges "
                 "each picture and makes it again with the next seed while it scores below the threshold")


def _webhook_url() -> Any:
    return Field(None, max_length=MAX_URL_CHARS, json_schema_extra={"pattern": URL_PATTERN},
                 description="https (or http) URL that gets this work's signed events; its address is checked "
                 "against the service's policy at each delivery", examples=["https://hooks.example.com/bagel"])


def _metadata(what: str) -> Any:
    return Field(None, description=f"your JSON object (at most 16 KiB), returned with the {what} and in its "
                 "webhooks", examples=[{"sku": "MUG-01"}])


def _deadline() -> Any:
    return Field(None, ge=1, le=MAX_DEADLINE_S, description="seconds from submission after which a job that "
                 "has not finished expires (as does the Cancel-After header; the smaller wins)")


def _num(name: str, **extra: Any) -> Any:
    rng = LIMITS[name]
    bounds = {"gt" if rng.low_open else "ge": rng.low, "le": rng.high}
    extra.setdefault("description", name.replace("_", " "))
    return Field(None, **bounds, **extra)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationParamsIn(Strict):
    """BAGEL hyper-parameters; anything left out takes the task's default."""

    cfg_text_scale: float | None = _num("cfg_text_scale", description="text CFG scale")
    cfg_img_scale: float | None = _num("cfg_img_scale", description="image CFG scale (edit/try-on)")
    cfg_interval: tuple[float, float] | None = Field(
        None, description="[start, end] of the CFG window, 0 <= start <= end <= 1",
        json_schema_extra={"items": {"type": "number", "minimum": 0, "maximum": 1}}, examples=[[0.4, 1.0]])
    timestep_shift: float | None = _num("timestep_shift", description="shift of the denoising schedule")
    num_timesteps: int | None = _num("num_timesteps", description="denoising steps")
    cfg_renorm_min: float | None = _num("cfg_renorm_min", description="floor of the CFG renormalisation")
    cfg_renorm_type: RenormType | None = Field(None, description="how CFG output is renormalised")
    max_think_tokens: int | None = _num("max_think_tokens", description="length limit of the reasoning (think)")
    max_new_tokens: int | None = _num("max_new_tokens", description="answer length (understand)")
    do_sample: bool | None = Field(None, description="sample text instead of greedy decoding")
    text_temperature: float | None = _num("text_temperature", description="temperature when sampling text")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="makes the result reproducible")
    taylorseer: bool | None = Field(None, description="TaylorSeer step caching (generate/edit/try-on): "
                                    "predicts most denoising steps from the computed ones — faster, an "
                                    "approximation; off by default, as in the reference")


class JobIn(Strict):
    """One job. ``tryon``: an edit of the product image (``input_file_ids[0]``) into the scene
    described by ``prompt``, with defaults tuned to keep the product as it is."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": INPUT_RULES, "examples": [
        {"task": "tryon", "prompt": "the mug on a sunlit wooden breakfast table", "input_file_ids": ["f_1"],
         "seed": 7, "webhook_url": "https://hooks.example.com/bagel", "metadata": {"sku": "MUG-01"}}]})

    task: Task = Field(description=TASK_TEXT)
    prompt: str = _prompt()
    input_file_ids: list[str] = _file_ids(default_factory=list)
    think: bool = Field(False, description="reason in text before answering or drawing (slower; the reasoning "
                        "is returned as think_text)")
    width: int | None = _side("width", "generate only (edit and tryon keep the input's proportions)")
    height: int | None = _side("height", "generate only (edit and tryon keep the input's proportions)")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="shorthand for params.seed")
    params: GenerationParamsIn | None = Field(None, description="hyper-parameters; unset ones take the task's "
                                              "defaults")
    adapter: str | None = _adapter()
    adapter_scale: float | None = _adapter_scale()
    quality_gate: QualityGateIn | None = _quality_gate("this job")
    webhook_url: str | None = _webhook_url()
    metadata: dict[str, Any] | None = _metadata("job")
    priority: Priority = _priority()
    deadline_s: int | None = _deadline()


class BatchItemIn(Strict):
    """One item of a batch; unset fields take the batch's values."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "the mug on a marble kitchen counter, soft morning light", "seed": 1}]})

    task: Task | None = Field(None, description="the batch's task when unset; " + TASK_TEXT)
    prompt: str = _prompt()
    input_file_ids: list[str] | None = _file_ids(default=None)
    think: bool | None = Field(None, description="the batch's think when unset")
    width: int | None = _side("width", "generate only")
    height: int | None = _side("height", "generate only")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="this item's seed")
    params: GenerationParamsIn | None = Field(None, description="over the batch's params")
    quality_gate: QualityGateIn | None = _quality_gate("this item (over the batch's)")
    metadata: dict[str, Any] | None = _metadata("job")


class BatchIn(Strict):
    """Many jobs at once. Try-on form: ``{"task": "tryon", "product_file": id, "items":
    [{"prompt": scene, "seed": 1}, …]}``; general form: per-item ``task`` and ``input_file_ids``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "tryon", "product_file": "f_1", "items": [
            {"prompt": "the mug on a sunlit wooden breakfast table", "seed": 1},
            {"prompt": "the mug held in a hand on a snowy mountain trail", "seed": 2}],
         "webhook_url": "https://hooks.example.com/bagel", "metadata": {"campaign": "winter"}}]})

    task: Task | None = Field(None, description="every item's task unless the item sets one; " + TASK_TEXT)
    product_file: str | None = Field(None, min_length=1, max_length=64, json_schema_extra={"pattern": ID_PATTERN},
                                     description="input image shared by every item that sets no input_file_ids "
                                     "(try-on: the product)", examples=["f_1"])
    items: list[BatchItemIn] = Field(min_length=1, max_length=HARD_MAX_ITEMS, description="one job each, in "
                                     "order; at most the max_batch_items setting")
    think: bool = Field(False, description="every item's think unless the item sets one")
    width: int | None = _side("width", "generate items only")
    height: int | None = _side("height", "generate items only")
    params: GenerationParamsIn | None = Field(None, description="defaults for every item")
    adapter: str | None = _adapter()
    adapter_scale: float | None = _adapter_scale()
    quality_gate: QualityGateIn | None = _quality_gate("every item that sets none")
    webhook_url: str | None = _webhook_url()
    metadata: dict[str, Any] | None = _metadata("batch")
    priority: Priority = _priority()
    deadline_s: int | None = _deadline()


class FileOut(BaseModel):
    """An uploaded input image."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "f_1", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "content_type": "image/png", "format": "PNG", "width": 1024, "height": 1024, "size_bytes": 734512,
        "filename": "mug.png", "created_at": "2026-11-28T12:00:00Z"}]})

    id: str = Field(description="pass it in input_file_ids or product_file")
    sha256: str = Field(description="of the bytes; the same content uploaded again is the same file")
    content_type: str = Field(description="image/png, image/jpeg or image/webp")
    format: str = Field(description="PNG, JPEG or WEBP")
    width: int = Field(description="px, upright (EXIF orientation applied)")
    height: int = Field(description="px, upright (EXIF orientation applied)")
    size_bytes: int = Field(description="bytes as uploaded")
    filename: str | None = Field(description="the upload's filename, control characters removed")
    created_at: datetime = Field(description="when it was first uploaded")


class ErrorInfo(BaseModel):
    code: str = Field(description="why it failed, e.g. `gpu_out_of_memory`, `invalid_image`")
    message: str | None = Field(description="for a person")


class Progress(BaseModel):
    step: int = Field(description="denoising steps (or tokens) done")
    total: int = Field(description="steps of the whole job; 0 before it starts")


class Timings(BaseModel):
    queued_at: datetime = Field(description="when it was accepted")
    started_at: datetime | None = Field(description="when a GPU worker started its (last) attempt")
    finished_at: datetime | None = Field(description="when it reached a final status")
    model_seconds: float | None = Field(None, description="its share of the engine call it ran in")
    gpu_seconds: float | None = Field(None, description="the job's share of its chunks' GPU time (all attempts)")
    phases: dict[str, float] = Field(default_factory=dict, description="seconds per phase: queue, input, encode, "
                                     "prefill, think, denoise, decode, upload (engine phases: the whole chunk's)")


class QueueOut(BaseModel):
    """Where an active job or batch stands (see README "Scheduling")."""

    position: int = Field(description="jobs of all tenants dispatched before it (0: next or running)")
    tenant_position: int = Field(description="the tenant's own jobs dispatched before it")
    eta_s: float | None = Field(description="expected seconds until it finishes; null while no GPU worker is live")
    eta_at: datetime | None = Field(description="now + eta_s")
    live_workers: int = Field(description="GPU workers taking work now")


class Result(BaseModel):
    url: str | None = Field(None, description="presigned S3 URL or signed API download URL")
    url_expires_at: datetime | None = Field(None, description="when url stops working; read the job again for a "
                                            "fresh one")
    content_type: str | None = Field(None, description="of the file at url (image/png)")
    text: str | None = Field(None, description="answer (understand)")
    think_text: str | None = Field(None, description="the reasoning, when it was asked to think")
    expired: bool = Field(False, description="the result was deleted after the retention period")


class StatusCounts(BaseModel):
    """Jobs by status."""

    queued: int = Field(description="waiting for a GPU")
    running: int = Field(description="on a GPU now")
    succeeded: int = Field(description="finished with a result")
    failed: int = Field(description="gave up: see each job's error")
    canceled: int = Field(description="canceled before they finished")
    expired: int = Field(description="their deadline passed first")


class JobOut(BaseModel):
    """A job: what was asked, where it stands, and its result."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", "batch_id": None, "position": 0, "task": "tryon",
        "status": "succeeded", "prompt": "the mug on a sunlit wooden breakfast table", "input_file_ids": ["f_1"],
        "think": False, "width": 1024, "height": 1024, "params": {"num_timesteps": 50, "seed": 7}, "attempts": 1,
        "max_attempts": 3, "cancel_requested": False, "error": None, "progress": {"step": 50, "total": 50},
        "timings": {"queued_at": "2026-11-28T12:00:00Z", "started_at": "2026-11-28T12:00:02Z",
                    "finished_at": "2026-11-28T12:00:09Z", "model_seconds": 6.1, "gpu_seconds": 6.4,
                    "phases": {"queue": 2.0, "denoise": 5.2}},
        "result": {"url": "https://api.example.com/v1/objects/outputs/t/6f0c.png?expires=1796000000&sig=ab12",
                   "url_expires_at": "2026-11-28T13:00:09Z", "content_type": "image/png", "text": None,
                   "think_text": None, "expired": False},
        "metadata": {"sku": "MUG-01"}, "webhook_url": None, "created_at": "2026-11-28T12:00:00Z",
        "priority": "batch", "deadline_at": None, "queue": None, "rerun_of": None, "dedupe": "miss",
        "dedupe_of": None, "quality": None}]})

    id: str = Field(description="the job's id")
    batch_id: str | None = Field(description="its batch; null for a single job")
    position: int = Field(description="its index in the batch (0 for a single job)")
    task: Task = Field(description=TASK_TEXT)
    status: JobStatus = Field(description="queued → running → succeeded, failed, canceled or expired")
    prompt: str = Field(description="as submitted (try-on: the scene)")
    input_file_ids: list[str] = Field(description="its input images")
    think: bool = Field(description="whether it reasons before answering")
    width: int | None = Field(description="output width in px (null for understand); known from submission on")
    height: int | None = Field(description="output height in px (null for understand)")
    params: dict[str, Any] = Field(description="every hyper-parameter it runs with, defaults filled in "
                                   "(adapter_scale too when it runs with an adapter)")
    adapter: str | None = Field(None, description="the LoRA adapter it runs with; null: the base model")
    attempts: int = Field(description="GPU attempts started (outages spend none)")
    max_attempts: int = Field(description="attempts before it fails")
    cancel_requested: bool = Field(description="a cancel was asked for; a running job stops at its next step")
    error: ErrorInfo | None = Field(description="failed jobs only")
    progress: Progress = Field(description="steps done of the total")
    timings: Timings = Field(description="when it moved and where the time went")
    result: Result | None = Field(description="succeeded jobs only")
    metadata: dict[str, Any] = Field(description="as submitted")
    webhook_url: str | None = Field(description="where its events go")
    created_at: datetime = Field(description="when it was submitted")
    priority: Priority = Field(description="interactive or batch")
    deadline_at: datetime | None = Field(description="it expires if not finished by then")
    queue: QueueOut | None = Field(None, description="position and ETA while queued or running")
    rerun_of: str | None = Field(None, description="the job this one re-runs (POST /v1/jobs/{job_id}/rerun); null "
                                 "for a job submitted on its own")
    dedupe: Dedupe | None = Field(None, description=DEDUPE_TEXT)
    dedupe_of: str | None = Field(None, description=DEDUPE_OF_TEXT)
    quality: QualityOut | None = Field(None, description="the quality gate's record (jobs that asked for it, once "
                                       "succeeded)")
    session_id: str | None = Field(None, description="the session this job is a turn of (POST "
                                   "/v1/sessions/{session_id}/turns); null otherwise")
    turn_index: int | None = Field(None, description="its place among the session's turns, from 0")


class BatchOut(BaseModel):
    """A batch: its jobs' counts and progress."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "b2", "status": "active", "job_count": 40,
        "counts": {"queued": 19, "running": 1, "succeeded": 20, "failed": 0, "canceled": 0, "expired": 0},
        "progress": 0.51, "cancel_requested": False, "webhook_url": "https://hooks.example.com/bagel",
        "metadata": {"campaign": "winter"}, "created_at": "2026-11-28T12:00:00Z", "completed_at": None,
        "job_ids": None, "priority": "batch", "deadline_at": None, "gpu_seconds": 121.5,
        "queue": {"position": 3, "tenant_position": 0, "eta_s": 140.0, "eta_at": "2026-11-28T12:05:00Z",
                  "live_workers": 2}}]})

    id: str = Field(description="the batch's id")
    status: BatchStatus = Field(description="active until every job reached a final status")
    job_count: int = Field(description="jobs in it")
    counts: StatusCounts = Field(description="its jobs by status")
    progress: float = Field(description="0..1: finished jobs plus running jobs' step fraction")
    cancel_requested: bool = Field(description="a cancel was asked for")
    webhook_url: str | None = Field(description="where its events go")
    metadata: dict[str, Any] = Field(description="as submitted")
    created_at: datetime = Field(description="when it was submitted")
    completed_at: datetime | None = Field(description="when its last job finished")
    job_ids: list[str] | None = Field(None, description="in item order; returned on creation")
    priority: Priority = Field(description="interactive or batch")
    deadline_at: datetime | None = Field(description="its jobs expire if not finished by then")
    gpu_seconds: float = Field(0.0, description="GPU-seconds of its jobs so far")
    queue: QueueOut | None = Field(None, description="first active job's position, last job's ETA")


def example_of(model: type[BaseModel]) -> dict[str, Any]:
    """The first example a model declares."""
    return model.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]


class JobPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"items": [example_of(JobOut)], "page": 1, "page_size": 50, "total": 1, "next_page": None}]})

    items: list[JobOut] = Field(description="in position order")
    page: int = Field(description="this page's number, from 1")
    page_size: int = Field(description="jobs per page")
    total: int = Field(description="jobs in the batch")
    next_page: int | None = Field(description="null on the last page")


class JobList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [example_of(JobOut)], "next_cursor": None}]})

    data: list[JobOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class BatchList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [example_of(BatchOut)],
                                                              "next_cursor": None}]})

    data: list[BatchOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class UsageDay(BaseModel):
    date: Day = Field(description="a UTC day")
    task: Task = Field(description="the jobs' task")
    jobs: int = Field(description="jobs finished that UTC day, any final status")
    images: int = Field(description="succeeded jobs that made an image (every task but understand)")
    gpu_seconds: float = Field(description="their GPU-seconds")


class UsageTotals(BaseModel):
    jobs: int = Field(description="jobs finished in the period")
    images: int = Field(description="images made in the period")
    gpu_seconds: float = Field(description="GPU-seconds in the period")


class Usage(BaseModel):
    model_config = ConfigDict(populate_by_name=True, json_schema_extra={"examples": [{
        "from": "2026-11-01", "to": "2026-11-28",
        "days": [{"date": "2026-11-28", "task": "tryon", "jobs": 40, "images": 39, "gpu_seconds": 250.0}],
        "totals": {"jobs": 40, "images": 39, "gpu_seconds": 250.0}}]})

    from_: date = Field(alias="from", description="first day, inclusive")
    to: date = Field(description="last day, inclusive")
    days: list[UsageDay] = Field(description="per day and task, days with jobs only")
    totals: UsageTotals = Field(description="over the period")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "checks": {}}]})

    status: Literal["ok", "unavailable"] = Field(description="ok when the checks pass")
    checks: dict[str, str] = Field(default_factory=dict, description="failed dependencies and why")


class WebhookTestIn(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://hooks.example.com/bagel"}]})

    url: str = Field(min_length=1, max_length=MAX_URL_CHARS, json_schema_extra={"pattern": URL_PATTERN},
                     description="where to send a signed `webhook.test` ping; checked like a job's webhook_url")


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
    """One webhook event for one URL, with every attempt to send it."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "msg_2f1e0d", "event": "batch.completed", "url": "https://hooks.example.com/bagel",
        "status": "delivered", "job_id": None, "batch_id": "b2", "created_at": "2026-11-28T12:00:00Z",
        "next_attempt_at": None, "delivered_at": "2026-11-28T12:00:01Z", "replayed_at": None,
        "attempts": [{"attempt": 1, "at": "2026-11-28T12:00:01Z", "status_code": 200, "latency_ms": 84.2,
                      "error": None, "address": "203.0.113.7"}], "payload": None}]})

    id: str = Field(description="the `webhook-id` header of every attempt and replay")
    event: Event = Field(description="the event's name")
    url: str = Field(description="where it is sent")
    status: DeliveryStatus = Field(description="pending (an attempt is due), delivered (the last attempt got a "
                                   "2xx) or failed (given up: retry window over, or a permanent error)")
    job_id: str | None = Field(description="the job it is about, if one")
    batch_id: str | None = Field(description="the batch it is about, if one")
    created_at: datetime = Field(description="when the event happened")
    next_attempt_at: datetime | None = Field(description="when the next attempt is due (pending only)")
    delivered_at: datetime | None = Field(description="when an attempt last got a 2xx")
    replayed_at: datetime | None = Field(description="the last replay asked for; the retry window counts from it")
    attempts: list[DeliveryAttemptOut] = Field(description="oldest first")
    payload: dict[str, Any] | None = Field(None, description="the event body as stored (result URLs are minted at "
                                           "each send); only on GET /v1/webhooks/deliveries/{id}, replay and test")


class DeliveryList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [example_of(DeliveryOut)],
                                                              "next_cursor": None}]})

    data: list[DeliveryOut] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class ManifestEntry(BaseModel):
    """One job of a batch manifest: the ``batch.completed`` manifest's fields (job_id, position,
    status, output_key, error_code, output_url), then the rest; also the CSV's columns, in order."""

    job_id: str = Field(description="the job's id")
    position: int = Field(description="its index in the batch")
    status: JobStatus = Field(description="its status now")
    output_key: str | None = Field(description="the result's storage key")
    error_code: str | None = Field(description="failed or expired jobs only")
    output_url: str | None = Field(description="succeeded jobs: presigned S3 URL or signed API download URL; "
                                   "null once the result expired")
    output_url_expires_at: datetime | None = Field(description="when output_url stops working")
    error_message: str | None = Field(description="failed or expired jobs only")
    task: Task = Field(description="the job's task")
    prompt: str = Field(description="as submitted")
    think: bool = Field(description="whether it was asked to reason before answering")
    think_text: str | None = Field(description="the reasoning")
    output_text: str | None = Field(description="answer (understand)")
    queued_at: datetime = Field(description="when it was accepted")
    started_at: datetime | None = Field(description="when its last attempt started")
    finished_at: datetime | None = Field(description="when it reached a final status")
    model_seconds: float | None = Field(description="its share of the engine call it ran in")
    gpu_seconds: float | None = Field(description="its share of its chunks' GPU time")
    seq: int | None = Field(description="the batch report that first counted it final (see `since`); null until "
                            "one did")


class Manifest(BaseModel):
    """A batch's jobs in position order with its counts: valid at any time, final once completed."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "batch_id": "b2", "status": "active", "completed_at": None,
        "counts": {"queued": 39, "running": 0, "succeeded": 1, "failed": 0, "canceled": 0, "expired": 0},
        "done": 1, "total": 40, "seq": 1, "metadata": {}, "next_cursor": "1", "jobs": [{
            "job_id": "j1", "position": 0, "status": "succeeded", "output_key": "outputs/t/j1.png",
            "error_code": None, "output_url": "https://api.example.com/v1/objects/outputs/t/j1.png?expires=1&sig=a",
            "output_url_expires_at": "2026-11-28T13:00:00Z", "error_message": None, "task": "tryon",
            "prompt": "the mug on a desk", "think": False, "think_text": None, "output_text": None,
            "queued_at": "2026-11-28T12:00:00Z", "started_at": "2026-11-28T12:00:02Z",
            "finished_at": "2026-11-28T12:00:09Z", "model_seconds": 6.1, "gpu_seconds": 6.4, "seq": 1}]}]})

    batch_id: str = Field(description="the batch's id")
    status: BatchStatus = Field(description="active or completed")
    completed_at: datetime | None = Field(description="when its last job finished")
    counts: StatusCounts = Field(description="its jobs by status")
    done: int = Field(description="jobs in a final status: succeeded, failed, canceled or expired")
    total: int = Field(description="jobs in the batch")
    seq: int = Field(description="the batch's last report (batch.progress events, then batch.completed); "
                     "pass it as ?since= next time to get only the jobs later reports count final")
    metadata: dict[str, Any] = Field(description="as submitted")
    jobs: list[ManifestEntry] = Field(description="this page's jobs in position order")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")
