"""``/v1/jobs/{job_id}/provenance`` and ``/v1/jobs/{job_id}/rerun``: what made a job's output, and
the same request submitted again as a new job linked to the first.

Owns: their wire format (``Provenance``, ``RerunIn``). A job has provenance once a GPU worker
finished it (succeeded, or failed in the engine); before that, or when it never ran (canceled,
expired, failed before the engine), reading it is a 409 ``provenance_not_recorded``. A re-run may
be asked of a job in any status — the request is fixed at submission, its seed included — within
the tenant's limits and with an ``Idempotency-Key``, like ``POST /v1/jobs``; the new job is a
single job (no batch, no deadline) with ``rerun_of`` set. Leaves the record to
``worker.provenance``, the re-run's checks to ``api.submission.rerun_spec`` and the state change
to ``worker.jobs``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api import idempotency, submission
from api.contract import CREATE, READ_ONE, IdempotencyKey, errors
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.routes.jobs import JOB_ID
from api.schemas import JobOut, Strict, Task
from api.views import job_out
from worker import jobs, limits, queries
from worker.errors import NotFound, ProvenanceNotRecorded
from worker.models import JobStatus, Priority, utcnow
from worker.params import LIMITS

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ROUTE = "POST /v1/jobs/{job_id}/rerun"
_SHA = "3f1c9a7e5b2d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60"


class Provenance(BaseModel):
    """What made a job's output: the weights, the software, the device, every parameter and the
    output's hash (see README "Provenance and re-run")."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "job_id": "6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", "status": "succeeded", "rerun_of": None,
        "recorded_at": "2026-11-28T12:00:09Z", "record_version": 1, "weights_sha256": _SHA,
        "model": "BAGEL-7B-MoT", "quantization": "nf4", "offload": "none", "dtype": "bfloat16", "device": "cuda:0",
        "device_name": "NVIDIA L4", "torch_threads": 8, "engine_version": "0.1.0", "python_version": "3.12.8",
        "torch_version": "2.9.1+cu128", "cuda_version": "12.8", "cudnn_version": "91002",
        "bitsandbytes_version": "0.48.2",
        "noise_source": "torch.Generator(device='cuda:0').manual_seed(params.seed); …",
        "task": "tryon", "params": {"num_timesteps": 50, "seed": 7, "cfg_img_scale": 2.5, "taylorseer": False},
        "seed": 7, "result_seed": 7, "quality_gate": None, "answered_from": None, "session_context": None,
        "think": False, "think_text_sha256": None, "think_text": None, "taylorseer": False,
        "adapter_id": None, "adapter_scale": None, "width": 1024, "height": 1024,
        "worker_id": "gpu-0:4121:a1b2c3", "hostname": "gpu-0", "output_sha256": _SHA}]})

    job_id: str = Field(description="the job it describes")
    status: JobStatus = Field(description="the job's status: succeeded, or failed when the engine failed it")
    rerun_of: str | None = Field(description="the job this one re-ran, if it is a re-run")
    recorded_at: datetime | None = Field(description="when the GPU worker recorded it (the job's finish)")
    record_version: int = Field(description="the record's format; bumped when a field changes meaning")
    weights_sha256: str = Field(description="the checkpoint's identity: SHA-256 over every tensor's name, dtype, "
                                "shape and first and last 4 KiB in ema.safetensors and ae.safetensors, computed "
                                "once when the worker loaded it, whatever the quantization")
    model: str = Field(description="the checkpoint folder's name")
    quantization: str = Field(description="how the decoder linears were loaded: none, nf4 or int8")
    offload: str = Field(description="none, or layers (decoder layers streamed from host memory)")
    dtype: str = Field(description="the weights' and activations' dtype, e.g. bfloat16 on CUDA, float32 on CPU")
    device: str = Field(description="the torch device it ran on, e.g. cuda:0 or cpu")
    device_name: str = Field(description="the GPU's name (CUDA), else the CPU architecture")
    torch_threads: int = Field(description="torch's intra-op threads: CPU results depend on it")
    engine_version: str = Field(description="the version of bagel-jobs the worker ran")
    python_version: str = Field(description="the worker's Python")
    torch_version: str = Field(description="the worker's torch")
    cuda_version: str | None = Field(description="the CUDA torch was built with; null for a CPU build")
    cudnn_version: str | None = Field(description="cuDNN's version; null without it")
    bitsandbytes_version: str | None = Field(description="with quantization: the bitsandbytes that ran it")
    noise_source: str = Field(description="how the noise was drawn: a torch.Generator on the device, seeded "
                              "with the job's seed")
    task: Task = Field(description="the job's task")
    params: dict[str, Any] = Field(description="every parameter as run, defaults filled in, seed included")
    seed: int | None = Field(description="the seed of the initial noise (also in params)")
    result_seed: int | None = Field(None, description="the seed of the picture kept: the seed, or a later one when "
                                    "the quality gate made the picture again")
    quality_gate: dict[str, Any] | None = Field(None, description="the quality gate it ran with (threshold, "
                                                "max_regenerations); null without")
    answered_from: str | None = Field(None, description="set when an identical job's result answered this one "
                                      "(dedupe hit): that job, whose record this is")
    session_context: dict[str, Any] | None = Field(None, description="a session's turn: its session and how many "
                                                   "parts of its context the worker's cache held (0: prefilled "
                                                   "from the transcript)")
    think: bool = Field(description="whether it reasoned first")
    think_text_sha256: str | None = Field(description="SHA-256 of the reasoning (UTF-8); null without think")
    think_text: str | None = Field(description="the reasoning itself, while the result is kept; null without "
                                   "think or once it expired")
    taylorseer: bool = Field(description="whether TaylorSeer step caching was on")
    adapter_id: str | None = Field(description="the LoRA adapter it ran with; null: the base model")
    adapter_scale: float | None = Field(description="the adapter's scale; null without one")
    width: int | None = Field(description="output width in px; null for understand")
    height: int | None = Field(description="output height in px; null for understand")
    worker_id: str = Field(description="the GPU worker process that ran it")
    hostname: str = Field(description="the host of that worker")
    output_sha256: str | None = Field(description="SHA-256 of the stored output (the PNG, or the answer's UTF-8 "
                                      "text); null when it failed")


def _override(name: str, description: str, example: float) -> Any:
    rng = LIMITS[name]
    return Field(None, ge=rng.low, le=rng.high, description=description, examples=[example])


class RerunIn(Strict):
    """What to change in a re-run; everything else is the first job's, its seed included."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"seed": 8}]})

    seed: int | None = _override("seed", "another seed: another picture from the same request", 8)
    num_timesteps: int | None = _override("num_timesteps", "another number of denoising steps", 30)
    cfg_text_scale: float | None = _override("cfg_text_scale", "another text CFG scale", 4.0)
    cfg_img_scale: float | None = _override("cfg_img_scale", "another image CFG scale (edit/try-on)", 2.0)


@router.get("/{job_id}/provenance", response_model=Provenance, responses=errors(*READ_ONE, 409),
            summary="Get a job's provenance")
def get_provenance(job_id: Annotated[str, JOB_ID], tenant: TenantDep, session: SessionDep) -> Provenance:
    """What made the job's output: weights identity, quantization, dtype, device, versions, every
    parameter and seed, the noise source and the output's SHA-256. A 409 until a GPU worker
    recorded it (queued, running, or ended without running)."""
    job = queries.get_job(session, tenant.id, job_id)
    if job is None:
        raise NotFound(f"job_id: job {job_id!r} not found", field="job_id")
    status = JobStatus(job.status)
    if job.provenance is None:
        raise ProvenanceNotRecorded(f"job_id: job {job_id!r} is {status.value} and has no provenance; a GPU worker "
                                    "records it when it finishes the job", field="job_id")
    return Provenance(**job.provenance, job_id=job.id, status=status.value, rerun_of=job.rerun_of,
                      recorded_at=job.finished_at, think_text=job.think_text)


@router.post("/{job_id}/rerun", status_code=202, response_model=JobOut, responses=errors(*CREATE, 404),
             summary="Re-run a job")
def rerun_job(job_id: Annotated[str, JOB_ID], tenant: TenantDep, session: SessionDep, settings: SettingsDep,
              store: StoreDep, body: Annotated[RerunIn, Body(default_factory=RerunIn)],
              idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Submit the job's request again as a new job (`rerun_of` names the first): the same task,
    prompt, inputs, think, size, adapter and parameters, its seed included, with the body's
    overrides applied. On the same hardware and versions a CPU worker makes the same PNG bit for
    bit. A re-run always computes (it is never answered from the first job's result). 202 with
    the new job; within the tenant's limits like `POST /v1/jobs`."""
    key = idempotency.check_key(idempotency_key)
    overrides = body.model_dump(exclude_none=True)
    digest = idempotency.fingerprint({"job_id": job_id, **overrides})
    if (previous := idempotency.replay(session, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    job = queries.get_job(session, tenant.id, job_id)
    if job is None:
        raise NotFound(f"job_id: job {job_id!r} not found", field="job_id")
    now = utcnow()
    spec = submission.rerun_spec(session, settings, tenant.id, job, overrides)
    webhook_url = submission.check_webhook(settings, job.webhook_url)
    limits.check_submission(session, tenant, new_jobs=1, now=now)
    _, rows = jobs.submit(session, tenant.id, [spec], batch=False, webhook_url=webhook_url, metadata=spec.metadata,
                          max_attempts=settings.max_attempts, priority=Priority(job.priority), commit=False)
    out = job_out(rows[0], store, settings).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, ROUTE, digest, 202, out)) is not None:
        return winner
    return JSONResponse(out, status_code=202)
