"""Request and response bodies of the API (pydantic), with their limits declared on the fields
so a 422 names the field and the limit, and the OpenAPI docs show them.

Owns: the wire format. Ranges of hyper-parameters come from ``worker.params.LIMITS`` (one
source of truth; ``worker.params.resolve`` checks again and fills per-task defaults). Limits
that are settings (batch size, output side) are checked in the routes, which know the settings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.params import LIMITS, MAX_PROMPT_CHARS, MAX_URL_CHARS, SEED_MAX

Task = Literal["generate", "edit", "understand", "tryon"]
RenormType = Literal["global", "channel", "text_channel"]
HARD_MAX_ITEMS = 100_000  # parsing bound; the real limit is the max_batch_items setting
MAX_INPUT_FILES = 4
ID = Field(min_length=1, max_length=64)


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
    model_seconds: float | None


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


class JobPage(BaseModel):
    items: list[JobOut]
    page: int
    page_size: int
    total: int
    next_page: int | None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
