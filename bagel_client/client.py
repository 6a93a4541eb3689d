"""``Client``: the synchronous SDK over ``httpx.Client``.

Owns: sending the requests ``bagel_client.calls`` describes, with the retries of
``bagel_client.retries`` (sleeping between them), and the loops on top: paging through
listings, polling in ``wait``, the try-on helper. Also LoRA adapters (upload, list, read,
delete; ``adapter=`` on submissions), the quality gate (``quality_gate=`` on submissions), a
job's provenance and its re-run, and sessions (create, add a turn, read the transcript,
delete). ``AsyncClient`` is the same with ``await``.

    with Client("http://127.0.0.1:8000", "bj_…") as client:
        batch = client.tryon("bag.png", ["on a marble counter", "on a beach at sunset"])
        batch = client.wait(batch, progress=lambda done, total: print(done, total))
        for job in client.batch_jobs(batch):
            client.download(job, f"results/{job.position}.png")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, overload

import httpx

from bagel_client import calls
from bagel_client.calls import (
    AdapterSource,
    QualityGateSource,
    SessionPartSource,
    UploadSource,
)
from bagel_client.errors import WaitTimeout
from bagel_client.models import (
    Adapter,
    Batch,
    BatchItem,
    Delivery,
    File,
    GenerationParams,
    Job,
    JobStatus,
    Priority,
    Provenance,
    Session,
    Share,
    Task,
    TurnTask,
)
from bagel_client.retries import RetryPolicy
from bagel_client.waiting import Poller, ProgressCallback, timeout_message


class Client:
    """The job service's API. ``base_url`` and ``api_key`` default to ``BAGEL_API_URL`` and
    ``BAGEL_API_KEY``; ``timeout_s`` bounds each HTTP request; ``retry`` says how refused
    (429, 502–504) and failed requests are sent again."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout_s: float = 30.0,
                 retry: RetryPolicy | None = None) -> None:
        self.base_url, self._api_key = calls.credentials(base_url, api_key)
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                  headers={"user-agent": calls.USER_AGENT})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, call: calls.Call) -> httpx.Response:
        retry = 0
        while True:
            retry += 1
            try:
                response = self._http.request(call.method, call.url, params=call.params, json=call.json,
                                              files=call.files, data=call.data,
                                              headers=call.headers(self._api_key))
            except httpx.TransportError as exc:
                delay = self.retry.after_error(retry, exc, call.what)
            else:
                if response.is_success:
                    return response
                delay = self.retry.after_response(retry, response, call.what)
            time.sleep(delay)

    def _json(self, call: calls.Call) -> Any:
        return self._send(call).json()

    # Files

    def upload(self, source: UploadSource, *, filename: str | None = None,
               idempotency_key: str | None = None) -> File:
        """Upload an input image (PNG, JPEG or WebP): a path, bytes or a binary file object."""
        return File.from_json(self._json(calls.upload(source, filename, idempotency_key)))

    def get_file(self, file_id: str) -> File:
        return File.from_json(self._json(calls.get(calls.file_path(file_id))))

    # Adapters

    def upload_adapter(self, name: str, source: AdapterSource, *, idempotency_key: str | None = None) -> Adapter:
        """Register a LoRA adapter under ``name`` (unique per tenant): the folder PEFT's
        ``save_pretrained`` wrote, or a ``(config, weights)`` pair of paths, bytes or binary file
        objects. The API checks it against the base model (a 422 names the module at fault)."""
        return Adapter.from_json(self._json(calls.upload_adapter(name, source, idempotency_key)))

    def list_adapters(self) -> list[Adapter]:
        """The tenant's adapters, newest first."""
        return [Adapter.from_json(a) for a in self._json(calls.get("/v1/adapters"))["data"]]

    def get_adapter(self, adapter_id: str) -> Adapter:
        return Adapter.from_json(self._json(calls.get(calls.adapter_path(adapter_id))))

    def delete_adapter(self, adapter: str | Adapter) -> None:
        """Delete the adapter and its files; a 409 ``ApiError`` while queued or running jobs use it."""
        self._send(calls.Call("DELETE", calls.adapter_path(adapter)))

    # Submitting

    def submit_job(self, task: Task, prompt: str, *, input_files: Sequence[str | File] = (), think: bool = False,
                   width: int | None = None, height: int | None = None, seed: int | None = None,
                   params: GenerationParams | None = None, adapter: str | Adapter | None = None,
                   adapter_scale: float | None = None, quality_gate: QualityGateSource | None = None,
                   webhook_url: str | None = None, metadata: Mapping[str, Any] | None = None,
                   priority: Priority | None = None, deadline_s: int | None = None,
                   idempotency_key: str | None = None) -> Job:
        """One job; ``input_files``: uploaded files or their ids (edit and try-on: the picture);
        ``adapter``: a LoRA adapter (or its id) to run with, at ``adapter_scale`` (default 1.0);
        ``quality_gate``: a ``QualityGate`` (or its dict) to have BAGEL judge the picture and
        make it again with the next seed below the threshold (generate, edit, tryon). With a
        ``seed``, an identical earlier job may answer it at once (``dedupe == "hit"``)."""
        return Job.from_json(self._json(calls.submit_job(
            task, prompt, input_files=input_files, think=think, width=width, height=height, seed=seed,
            params=params, adapter=adapter, adapter_scale=adapter_scale, quality_gate=quality_gate,
            webhook_url=webhook_url, metadata=metadata, priority=priority, deadline_s=deadline_s,
            idempotency_key=idempotency_key)))

    def submit_batch(self, items: Sequence[BatchItem], *, task: Task | None = None,
                     product_file: str | File | None = None, think: bool | None = None, width: int | None = None,
                     height: int | None = None, params: GenerationParams | None = None,
                     adapter: str | Adapter | None = None, adapter_scale: float | None = None,
                     quality_gate: QualityGateSource | None = None, webhook_url: str | None = None,
                     metadata: Mapping[str, Any] | None = None, priority: Priority | None = None,
                     deadline_s: int | None = None, idempotency_key: str | None = None) -> Batch:
        """Many jobs at once; the batch's fields (``adapter`` and ``quality_gate`` included) are
        every item's defaults (an item's own ``quality_gate`` wins). The answer lists ``job_ids``
        in item order."""
        return Batch.from_json(self._json(calls.submit_batch(
            items, task=task, product_file=product_file, think=think, width=width, height=height, params=params,
            adapter=adapter, adapter_scale=adapter_scale, quality_gate=quality_gate, webhook_url=webhook_url,
            metadata=metadata, priority=priority, deadline_s=deadline_s, idempotency_key=idempotency_key)))

    def tryon(self, product: UploadSource | File, prompts: Sequence[str | BatchItem], *, seed: int | None = None,
              think: bool | None = None, params: GenerationParams | None = None, adapter: str | Adapter | None = None,
              adapter_scale: float | None = None, quality_gate: QualityGateSource | None = None,
              webhook_url: str | None = None, metadata: Mapping[str, Any] | None = None,
              priority: Priority | None = None, deadline_s: int | None = None,
              idempotency_key: str | None = None) -> Batch:
        """One product picture in many scenes: uploads ``product`` once (unless it is an uploaded
        ``File``) and submits one try-on batch, one job per prompt; ``seed``: item i gets seed + i;
        ``quality_gate``: every item's (see ``submit_job``)."""
        items = calls.tryon_items(prompts, seed)
        product_file = product if isinstance(product, File) else self.upload(product)
        return self.submit_batch(items, task="tryon", product_file=product_file, think=think, params=params,
                                 adapter=adapter, adapter_scale=adapter_scale, quality_gate=quality_gate,
                                 webhook_url=webhook_url, metadata=metadata, priority=priority,
                                 deadline_s=deadline_s, idempotency_key=idempotency_key)

    # Sessions

    def create_session(self, *, system_prompt: str | None = None, parts: Sequence[SessionPartSource] = (),
                       metadata: Mapping[str, Any] | None = None) -> Session:
        """A session whose turns see the earlier turns; ``system_prompt`` and the opening ``parts``
        (a string is a text, a ``File`` a picture, or their ``{"text"}`` / ``{"file_id"}`` dicts)
        come first in every turn's context."""
        return Session.from_json(self._json(calls.create_session(system_prompt, parts, metadata)))

    def get_session(self, session: str | Session) -> Session:
        """The session with its turns and transcript (pictures with fresh download URLs)."""
        return Session.from_json(self._json(calls.get(calls.session_path(session))))

    def delete_session(self, session: str | Session) -> None:
        """Delete the session, its turns (a running one stops) and their results; uploaded files stay."""
        self._send(calls.Call("DELETE", calls.session_path(session)))

    def add_turn(self, session: str | Session, task: TurnTask, prompt: str, *, input_files: Sequence[str | File] = (),
                 think: bool = False, seed: int | None = None, params: GenerationParams | None = None,
                 width: int | None = None, height: int | None = None, webhook_url: str | None = None,
                 metadata: Mapping[str, Any] | None = None, idempotency_key: str | None = None) -> Job:
        """Queue a turn (understand, generate or edit) that sees the session's context, then
        ``input_files`` and ``prompt``; returns its job (``wait`` it like any job). Turns run in
        order. A picture turn takes the size of the latest picture in the context; ``width`` and
        ``height`` only when there is none (a 422 otherwise)."""
        return Job.from_json(self._json(calls.add_turn(
            session, task, prompt, input_files=input_files, think=think, seed=seed, params=params, width=width,
            height=height, webhook_url=webhook_url, metadata=metadata, idempotency_key=idempotency_key)))

    # Reading and listing

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._json(calls.get(calls.job_path(job_id))))

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(self._json(calls.get(calls.batch_path(batch_id))))

    def batch_jobs(self, batch: str | Batch) -> list[Job]:
        """Every job of the batch, in item order."""
        jobs: list[Job] = []
        page: int | None = 1
        while page is not None:
            body = self._json(calls.get(f"{calls.batch_path(batch)}/jobs",
                                        {"page": page, "page_size": calls.BATCH_JOBS_PAGE_SIZE}))
            jobs.extend(Job.from_json(j) for j in body["items"])
            page = body.get("next_page")
        return jobs

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            body = self._json(calls.get(path, {**params, "cursor": cursor}))
            yield from body["data"]
            cursor = body.get("next_cursor")
            if not cursor:
                return

    def list_jobs(self, *, status: JobStatus | None = None, task: Task | None = None, batch_id: str | None = None,
                  created_after: datetime | None = None, created_before: datetime | None = None,
                  page_size: int = calls.LIST_PAGE_SIZE) -> Iterator[Job]:
        """The tenant's jobs, newest first, following the cursors page by page as you iterate."""
        params = calls.list_params(created_after, created_before, page_size, status=status, task=task,
                                   batch_id=batch_id)
        return (Job.from_json(j) for j in self._pages("/v1/jobs", params))

    def list_batches(self, *, status: Literal["active", "completed"] | None = None,
                     created_after: datetime | None = None, created_before: datetime | None = None,
                     page_size: int = calls.LIST_PAGE_SIZE) -> Iterator[Batch]:
        """The tenant's batches, newest first, following the cursors as you iterate."""
        params = calls.list_params(created_after, created_before, page_size, status=status)
        return (Batch.from_json(b) for b in self._pages("/v1/batches", params))

    # Cancel and wait

    def cancel_job(self, job: str | Job) -> Job:
        """Queued: canceled at once; running: stops at the next denoising step."""
        return Job.from_json(self._json(calls.Call("POST", f"{calls.job_path(job)}/cancel")))

    def cancel_batch(self, batch: str | Batch) -> Batch:
        """Cancels every job of the batch that has not finished."""
        return Batch.from_json(self._json(calls.Call("POST", f"{calls.batch_path(batch)}/cancel")))

    @overload
    def cancel(self, target: Job) -> Job: ...
    @overload
    def cancel(self, target: Batch) -> Batch: ...

    def cancel(self, target: Job | Batch) -> Job | Batch:
        return self.cancel_batch(target) if isinstance(target, Batch) else self.cancel_job(target)

    @overload
    def wait(self, target: Job, *, progress: ProgressCallback | None = ..., timeout_s: float | None = ...,
             poll_s: float = ..., max_poll_s: float = ...) -> Job: ...
    @overload
    def wait(self, target: Batch, *, progress: ProgressCallback | None = ..., timeout_s: float | None = ...,
             poll_s: float = ..., max_poll_s: float = ...) -> Batch: ...

    def wait(self, target: Job | Batch, *, progress: ProgressCallback | None = None, timeout_s: float | None = None,
             poll_s: float = 0.5, max_poll_s: float = 5.0) -> Job | Batch:
        """Poll until the job finishes or the batch completes and return it as last read.
        ``progress(done, total)``: jobs finished of a batch, denoising steps of a job; called
        first and then on every change. Raises ``WaitTimeout`` after ``timeout_s``."""
        poller = Poller(poll_s, max_poll_s, timeout_s, progress, time.monotonic())
        current = target
        while not poller.seen(current):
            delay = poller.next_delay(time.monotonic())
            if delay is None:
                raise WaitTimeout(timeout_message(current, timeout_s), current)
            time.sleep(delay)
            current = self.get_batch(current.id) if isinstance(current, Batch) else self.get_job(current.id)
        return current

    # Provenance and re-run

    def get_provenance(self, job: str | Job) -> Provenance:
        """What made a finished job's output (weights identity, versions, device, every parameter,
        the output's SHA-256); a 409 ``provenance_not_recorded`` ``ApiError`` until a GPU worker
        finished it, or when it never ran."""
        return Provenance.from_json(self._json(calls.get(f"{calls.job_path(job)}/provenance")))

    def rerun(self, job: str | Job, *, seed: int | None = None, num_timesteps: int | None = None,
              cfg_text_scale: float | None = None, cfg_img_scale: float | None = None,
              idempotency_key: str | None = None) -> Job:
        """Submit the job's request again as a new single job (``rerun_of`` names the first): the
        same task, prompt, inputs, adapter and parameters, its seed included, with the overrides
        given; the same worker set-up makes the same PNG."""
        return Job.from_json(self._json(calls.rerun(
            job, seed=seed, num_timesteps=num_timesteps, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
            idempotency_key=idempotency_key)))

    # Results

    def result_bytes(self, job: str | Job) -> bytes:
        """A succeeded job's image (a fresh URL is fetched when the job's has expired)."""
        current = job if isinstance(job, Job) else self.get_job(job)
        call = calls.download(current, fresh=not isinstance(job, Job))
        if call is None:
            call = calls.download(self.get_job(current.id), fresh=True)
        assert call is not None  # fresh=True returns a call or raises
        return self._send(call).content

    def download(self, job: str | Job, dest: str | os.PathLike[str]) -> Path:
        """Write a succeeded job's image to ``dest`` (a file path, or an existing folder: then
        ``<job id>.png`` in it); returns the path written."""
        current = job if isinstance(job, Job) else self.get_job(job)
        return calls.write_atomically(calls.download_path(current, dest), self.result_bytes(current))

    # Sharing

    def share_batch(self, batch: str | Batch, *, expires_in_s: int | None = None) -> Share:
        """A link to the batch's gallery page (results, live progress, a zip of all) that works
        without an API key until it expires: ``expires_in_s`` from 60 s to 30 days, default 7 days."""
        return Share.from_json(self._json(calls.share_batch(batch, expires_in_s)))

    # Webhook deliveries

    def list_deliveries(self, *, event: str | None = None, status: str | None = None, job_id: str | None = None,
                        batch_id: str | None = None, created_after: datetime | None = None,
                        created_before: datetime | None = None,
                        page_size: int = calls.LIST_PAGE_SIZE) -> Iterator[Delivery]:
        """The tenant's webhook deliveries with every attempt, newest first."""
        params = calls.list_params(created_after, created_before, page_size, event=event, status=status,
                                   job_id=job_id, batch_id=batch_id)
        return (Delivery.from_json(d) for d in self._pages("/v1/webhooks/deliveries", params))

    def get_delivery(self, delivery_id: str) -> Delivery:
        return Delivery.from_json(self._json(calls.get(calls.delivery_path(delivery_id))))

    def replay_delivery(self, delivery_id: str, *, idempotency_key: str | None = None) -> Delivery:
        """Send a delivered or failed delivery again (the same ``webhook-id``)."""
        return Delivery.from_json(self._json(calls.replay_delivery(delivery_id, idempotency_key)))

    def send_test_webhook(self, url: str, *, idempotency_key: str | None = None) -> Delivery:
        """Queue a signed ``webhook.test`` ping to ``url``."""
        return Delivery.from_json(self._json(calls.webhook_ping(url, idempotency_key)))
