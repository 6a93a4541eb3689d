"""The webhook events in the OpenAPI document (its ``webhooks`` section): what a tenant's
receiver gets, with the Standard Webhooks headers that sign it.

Owns: one body model per event (``type``, ``timestamp``, ``data``) — ``job.succeeded``,
``job.failed``, ``job.expired``, ``batch.progress``, ``batch.completed``, ``webhook.test`` — and
their registration on the app. The bodies are written by ``worker.outbox`` and
``worker.progress`` and sent by ``worker.webhooks`` (which adds ``output_url`` next to every
``output_key``); tests validate real deliveries against these schemas, so the two cannot drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header
from pydantic import BaseModel, ConfigDict, Field

from api.quality_schemas import DEDUPE_OF_TEXT, DEDUPE_TEXT, Dedupe, QualitySummary
from api.schemas import JobStatus, StatusCounts, Task
from worker import outbox

SIGNATURE_HEADERS_TEXT = (
    "Signed as Standard Webhooks specify: `webhook-id` (the delivery's id, the same on every retry and "
    "replay — drop repeats), `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature` "
    "(`v1,<base64 HMAC-SHA256 of id.timestamp.body>` with the tenant's `whsec_` secret). Answer 2xx within "
    "the timeout; anything else is retried with backoff, and every attempt is in `GET /v1/webhooks/deliveries`.")


class EventError(BaseModel):
    code: str = Field(description="why the job failed or expired, e.g. `gpu_out_of_memory`, `deadline_expired`")
    message: str | None = Field(description="for a person")


class JobEventData(BaseModel):
    job_id: str = Field(description="the job's id")
    batch_id: str | None = Field(description="its batch; null for a single job")
    position: int = Field(description="its index in the batch (0 for a single job)")
    task: Task = Field(description="what it did")
    status: JobStatus = Field(description="its final status")
    output_key: str | None = Field(description="the result's storage key; null without an image")
    output_url: str | None = Field(None, description="a download URL minted at this attempt (present with "
                                   "output_key)")
    output_text: str | None = Field(description="the answer (understand)")
    think_text: str | None = Field(description="the reasoning, when it was asked to think")
    error: EventError | None = Field(description="failed or expired jobs only")
    model_seconds: float | None = Field(description="its share of the engine call it ran in")
    gpu_seconds: float | None = Field(description="its share of its chunks' GPU time (all attempts)")
    metadata: dict[str, Any] = Field(description="the metadata it was submitted with")
    dedupe: Dedupe | None = Field(description=DEDUPE_TEXT)
    dedupe_of: str | None = Field(description=DEDUPE_OF_TEXT)
    quality: QualitySummary | None = Field(description="the quality gate's verdict (jobs that asked for it)")


class ManifestItem(BaseModel):
    job_id: str = Field(description="the job's id")
    position: int = Field(description="its index in the batch")
    status: JobStatus = Field(description="its final status")
    output_key: str | None = Field(description="the result's storage key")
    output_url: str | None = Field(None, description="a download URL minted at this attempt (with output_key)")
    error_code: str | None = Field(description="failed or expired jobs only")


class BatchCompletedData(BaseModel):
    batch_id: str = Field(description="the batch's id")
    completed_at: datetime = Field(description="when its last job reached a final status")
    counts: StatusCounts = Field(description="its jobs by status")
    metadata: dict[str, Any] = Field(description="the metadata it was submitted with")
    jobs: list[ManifestItem] = Field(description="every job in position order")


class BatchProgressData(BaseModel):
    batch_id: str = Field(description="the batch's id")
    seq: int = Field(description="this report's number (1, 2, …); `batch.completed` takes the next one")
    counts: StatusCounts = Field(description="its jobs by status now")
    done: int = Field(description="jobs in a final status")
    total: int = Field(description="jobs in the batch")
    newly_done: int = Field(description="jobs this report counted final for the first time")
    since: int = Field(description="the previous report's number: the manifest with ?since= this lists the "
                       "jobs this report counted final")
    manifest_path: str = Field(description="that manifest page, relative to the API's base URL")
    metadata: dict[str, Any] = Field(description="the metadata it was submitted with")


class WebhookTestData(BaseModel):
    message: str = Field(description="a fixed text")


def _event(name: str, data: type[BaseModel], example: dict[str, Any]) -> type[BaseModel]:
    stem = "".join(part.capitalize() for part in name.replace(".", "_").split("_"))
    return type(f"{stem}Event", (BaseModel,), {
        "__annotations__": {"type": Literal[name], "timestamp": datetime, "data": data},  # type: ignore[valid-type]
        "__doc__": f"The body of a `{name}` delivery.",
        "__module__": __name__,
        "model_config": ConfigDict(json_schema_extra={"examples": [{
            "type": name, "timestamp": "2026-11-28T12:00:00.000000Z", "data": example}]}),
        "type": Field(description="the event's name"),
        "timestamp": Field(description="when the event happened (not when this attempt was sent)"),
        "data": Field(description="the event's content"),
    })


_JOB_EXAMPLE = {"job_id": "6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", "batch_id": None, "position": 0,
                "task": "tryon", "status": "succeeded", "output_key": "outputs/t/6f0c.png",
                "output_url": "https://api.example.com/v1/objects/outputs/t/6f0c.png?expires=1796000000&sig=ab12",
                "output_text": None, "think_text": None, "error": None, "model_seconds": 4.2, "gpu_seconds": 4.6,
                "metadata": {"sku": "MUG-01"}, "dedupe": "miss", "dedupe_of": None,
                "quality": {"gate": "passed", "score": 0.71, "threshold": 0.6, "attempts": 2}}
_COUNTS = {"queued": 0, "running": 0, "succeeded": 39, "failed": 1, "canceled": 0, "expired": 0}
EVENTS: dict[str, tuple[type[BaseModel], dict[str, Any], str]] = {
    outbox.EVENT_JOB_SUCCEEDED: (JobEventData, _JOB_EXAMPLE, "A job finished with a result."),
    outbox.EVENT_JOB_FAILED: (JobEventData, dict(_JOB_EXAMPLE, status="failed", output_key=None, output_url=None,
                                                 error={"code": "gpu_out_of_memory", "message": "out of memory"}),
                              "A job failed after its attempts (errors that retrying cannot fix fail at once)."),
    outbox.EVENT_JOB_EXPIRED: (JobEventData, dict(_JOB_EXAMPLE, status="expired", output_key=None,
                                                  output_url=None, error={"code": "deadline_expired",
                                                                          "message": "the deadline passed before it started"}),
                               "A job's deadline passed before it finished."),
    outbox.EVENT_BATCH_PROGRESS: (BatchProgressData, {
        "batch_id": "b2", "seq": 3, "counts": dict(_COUNTS, succeeded=20, queued=19), "done": 21, "total": 40,
        "newly_done": 7, "since": 2, "manifest_path": "/v1/batches/b2/manifest?since=2", "metadata": {}},
        "A running batch's counts, at most one per `BATCH_PROGRESS_INTERVAL_S` per batch."),
    outbox.EVENT_BATCH_COMPLETED: (BatchCompletedData, {
        "batch_id": "b2", "completed_at": "2026-11-28T12:00:00Z", "counts": _COUNTS, "metadata": {},
        "jobs": [{"job_id": "j1", "position": 0, "status": "succeeded", "output_key": "outputs/t/j1.png",
                  "output_url": "https://api.example.com/v1/objects/outputs/t/j1.png?expires=1796000000&sig=ab",
                  "error_code": None}]},
        "Every job of a batch reached a final status; the manifest lists them."),
    outbox.EVENT_WEBHOOK_TEST: (WebhookTestData, {"message": outbox.TEST_MESSAGE},
                                "The ping `POST /v1/webhooks/test` sends."),
}
BODIES = {name: _event(name, data, example) for name, (data, example, _) in EVENTS.items()}


def install(app: FastAPI) -> None:
    """Register every event under the document's ``webhooks``."""
    for name, (_, _, summary) in EVENTS.items():
        def receiver(body: Any, webhook_id: str, webhook_timestamp: str, webhook_signature: str) -> None:
            """Sent to the job's or batch's `webhook_url`."""

        # Real objects, not the strings ``from __future__ import annotations`` leaves: FastAPI
        # reads the body model and the headers from them.
        receiver.__annotations__ = {
            "body": BODIES[name],
            "webhook_id": Annotated[str, Header(description="the delivery's id (`msg_…`)")],
            "webhook_timestamp": Annotated[str, Header(description="Unix seconds of this attempt")],
            "webhook_signature": Annotated[str, Header(description="`v1,<base64 signature>`")],
            "return": None,
        }
        app.webhooks.post(name, operation_id=name.replace(".", "_"), summary=summary,
                          description=f"{summary}\n\n{SIGNATURE_HEADERS_TEXT}", tags=["webhooks"],
                          responses={200: {"description": "received (any 2xx)"},
                                     "default": {"description": "anything else: retried with backoff until the "
                                                 "retry window ends"}})(receiver)
