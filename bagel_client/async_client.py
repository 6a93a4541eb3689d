"""``AsyncClient``: the SDK for asyncio over ``httpx.AsyncClient``, method for method the same as
``Client`` (``bagel_client.client``), with ``await`` and ``async for``.

Owns: sending the requests ``bagel_client.calls`` describes with the retries of
``bagel_client.retries`` (``asyncio.sleep`` between them), and the async loops: paging, polling,
the try-on helper. Reading and writing local files (uploads, adapters, downloads) runs in a
thread, so the event loop never blocks on the disk.

    async with AsyncClient() as client:       # BAGEL_API_URL, BAGEL_API_KEY
        job = await client.submit_job("tryon", "on a beach", input_files=[await client.upload("bag.png")])
        job = await client.wait(job, progress=print)
        await client.download(job, "beach.png")
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
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


class AsyncClient:
    """The job service's API for asyncio; see ``Client`` for the arguments."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout_s: float = 30.0,
                 retry: RetryPolicy | None = None) -> None:
        self.base_url, self._api_key = calls.credentials(base_url, api_key)
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s,
                                       headers={"user-agent": calls.USER_AGENT})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _send(self, call: calls.Call) -> httpx.Response:
        retry = 0
        while True:
            retry += 1
            try:
                response = await self._http.request(call.method, call.url, params=call.params, json=call.json,
                                                    files=call.files, data=call.data,
                                                    headers=call.headers(self._api_key))
            except httpx.TransportError as exc:
                delay = self.retry.after_error(retry, exc, call.what)
            else:
                if response.is_success:
                    return response
                delay = self.retry.after_response(retry, response, call.what)
            await asyncio.sleep(delay)

    async def _json(self, call: calls.Call) -> Any:
        return (await self._send(call)).json()

    # Files

    async def upload(self, source: UploadSource, *, filename: str | None = None,
                     idempotency_key: str | None = None) -> File:
        """Upload an input image (PNG, JPEG or WebP): a path, bytes or a binary file object."""
        call = await asyncio.to_thread(calls.upload, source, filename, idempotency_key)
        return File.from_json(await self._json(call))

    async def get_file(self, file_id: str) -> File:
        return File.from_json(await self._json(calls.get(calls.file_path(file_id))))

    # Adapters

    async def upload_adapter(self, name: str, source: AdapterSource, *,
                             idempotency_key: str | None = None) -> Adapter:
        """Register a LoRA adapter: PEFT's folder or a ``(config, weights)`` pair (see
        ``Client.upload_adapter``)."""
        call = await asyncio.to_thread(calls.upload_adapter, name, source, idempotency_key)
        return Adapter.from_json(await self._json(call))

    async def list_adapters(self) -> list[Adapter]:
        """The tenant's adapters, newest first."""
        return [Adapter.from_json(a) for a in (await self._json(calls.get("/v1/adapters")))["data"]]

    async def get_adapter(self, adapter_id: str) -> Adapter:
        return Adapter.from_json(await self._json(calls.get(calls.adapter_path(adapter_id))))

    async def delete_adapter(self, adapter: str | Adapter) -> None:
        """Delete the adapter and its files; a 409 ``ApiError`` while queued or running jobs use it."""
        await self._send(calls.Call("DELETE", calls.adapter_path(adapter)))

    # Submitting

    async def submit_job(self, task: Task, prompt: str, *, input_files: Sequence[str | File] = (),
                         think: bool = False, width: int | None = None, height: int | None = None,
                         seed: int | None = None, params: GenerationParams | None = None,
                         adapter: str | Adapter | None = None, adapter_scale: float | None = None,
                         quality_gate: QualityGateSource | None = None, webhook_url: str | None = None,
                         metadata: Mapping[str, Any] | None = None, priority: Priority | None = None,
                         deadline_s: int | None = None, idempotency_key: str | None = None) -> Job:
        """One job; ``input_files``: uploaded files or their ids (edit and try-on: the picture);
        ``adapter``: a LoRA adapter (or its id) to run with, at ``adapter_scale`` (default 1.0);
        ``quality_gate``: a ``QualityGate`` or its dict (see ``Client.submit_job``)."""
        return Job.from_json(await self._json(calls.submit_job(
            task, prompt, input_files=input_files, think=think, width=width, height=height, seed=seed,
            params=params, adapter=adapter, adapter_scale=adapter_scale, quality_gate=quality_gate,
            webhook_url=webhook_url, metadata=metadata, priority=priority, deadline_s=deadline_s,
            idempotency_key=idempotency_key)))

    async def submit_batch(self, items: Sequence[BatchItem], *, task: Task | None = None,
                           product_file: str | File | None = None, think: bool | None = None,
                           width: int | None = None, height: int | None = None, params: GenerationParams | None = None,
                           adapter: str | Adapter | None = None, adapter_scale: float | None = None,
                           quality_gate: QualityGateSource | None = None, webhook_url: str | None = None,
                           metadata: Mapping[str, Any] | None = None, priority: Priority | None = None,
                           deadline_s: int | None = None, idempotency_key: str | None = None) -> Batch:
        """Many jobs at once; the batch's fields (``adapter`` and ``quality_gate`` included) are
        every item's defaults (an item's own ``quality_gate`` wins)."""
        return Batch.from_json(await self._json(calls.submit_batch(
            items, task=task, product_file=product_file, think=think, width=width, height=height, params=params,
            adapter=adapter, adapter_scale=adapter_scale, quality_gate=quality_gate, webhook_url=webhook_url,
            metadata=metadata, priority=priority, deadline_s=deadline_s, idempotency_key=idempotency_key)))

    async def tryon(self, product: UploadSource | File, prompts: Sequence[str | BatchItem], *,
                    seed: int | None = None, think: bool | None = None, params: GenerationParams | None = None,
                    adapter: str | Adapter | None = None, adapter_scale: float | None = None,
                    quality_gate: QualityGateSource | None = None, webhook_url: str | None = None,
                    metadata: Mapping[str, Any] | None = None, priority: Priority | None = None,
                    deadline_s: int | None = None, idempotency_key: str | None = None) -> Batch:
        """One product picture in many scenes: one upload, one try-on batch (see ``Client.tryon``)."""
        items = calls.tryon_items(prompts, seed)
        product_file = product if isinstance(product, File) else await self.upload(product)
        return await self.submit_batch(items, task="tryon", product_file=product_file, think=think, params=params,
                                       adapter=adapter, adapter_scale=adapter_scale, quality_gate=quality_gate,
                                       webhook_url=webhook_url, metadata=metadata, priority=priority,
                                       deadline_s=deadline_s, idempotency_key=idempotency_key)

    # Sessions

    async def create_session(self, *, system_prompt: str | None = None, parts: Sequence[SessionPartSource] = (),
                             metadata: Mapping[str, Any] | None = None) -> Session:
        """A session whose turns see the earlier turns (see ``Client.create_session``)."""
        return Session.from_json(await self._json(calls.create_session(system_prompt, parts, metadata)))

    async def get_session(self, session: str | Session) -> Session:
        """The session with its turns and transcript (pictures with fresh download URLs)."""
        return Session.from_json(await self._json(calls.get(calls.session_path(session))))

    async def delete_session(self, session: str | Session) -> None:
        """Delete the session, its turns (a running one stops) and their results; uploaded files stay."""
        await self._send(calls.Call("DELETE", calls.session_path(session)))

    async def add_turn(self, session: str | Session, task: TurnTask, prompt: str, *,
                       input_files: Sequence[str | File] = (), think: bool = False, seed: int | None = None,
                       params: GenerationParams | None = None, width: int | None = None, height: int | None = None,
                       webhook_url: str | None = None, metadata: Mapping[str, Any] | None = None,
                       idempotency_key: str | None = None) -> Job:
        """Queue a turn that sees the session's context; returns its job (see ``Client.add_turn``)."""
        return Job.from_json(await self._json(calls.add_turn(
            session, task, prompt, input_files=input_files, think=think, seed=seed, params=params, width=width,
            height=height, webhook_url=webhook_url, metadata=metadata, idempotency_key=idempotency_key)))

    # Reading and listing

    async def get_job(self, job_id: str) -> Job:
        return Job.from_json(await self._json(calls.get(calls.job_path(job_id))))

    async def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(await self._json(calls.get(calls.batch_path(batch_id))))

    async def batch_jobs(self, batch: str | Batch) -> list[Job]:
        """Every job of the batch, in item order."""
        jobs: list[Job] = []
        page: int | None = 1
        while page is not None:
            body = await self._json(calls.get(f"{calls.batch_path(batch)}/jobs",
                                              {"page": page, "page_size": calls.BATCH_JOBS_PAGE_SIZE}))
            jobs.extend(Job.from_json(j) for j in body["items"])
            page = body.get("next_page")
        return jobs

    async def _pages(self, path: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            body = await self._json(calls.get(path, {**params, "cursor": cursor}))
            for item in body["data"]:
                yield item
            cursor = body.get("next_cursor")
            if not cursor:
                return

    async def list_jobs(self, *, status: JobStatus | None = None, task: Task | None = None,
                        batch_id: str | None = None, created_after: datetime | None = None,
                        created_before: datetime | None = None,
                        page_size: int = calls.LIST_PAGE_SIZE) -> AsyncIterator[Job]:
        """The tenant's jobs, newest first (``async for``), following the cursors."""
        params = calls.list_params(created_after, created_before, page_size, status=status, task=task,
                                   batch_id=batch_id)
        async for body in self._pages("/v1/jobs", params):
            yield Job.from_json(body)

    async def list_batches(self, *, status: Literal["active", "completed"] | None = None,
                           created_after: datetime | None = None, created_before: datetime | None = None,
                           page_size: int = calls.LIST_PAGE_SIZE) -> AsyncIterator[Batch]:
        """The tenant's batches, newest first (``async for``), following the cursors."""
        params = calls.list_params(created_after, created_before, page_size, status=status)
        async for body in self._pages("/v1/batches", params):
            yield Batch.from_json(body)

    # Cancel and wait

    async def cancel_job(self, job: str | Job) -> Job:
        """Queued: canceled at once; running: stops at the next denoising step."""
        return Job.from_json(await self._json(calls.Call("POST", f"{calls.job_path(job)}/cancel")))

    async def cancel_batch(self, batch: str | Batch) -> Batch:
        """Cancels every job of the batch that has not finished."""
        return Batch.from_json(await self._json(calls.Call("POST", f"{calls.batch_path(batch)}/cancel")))

    @overload
    async def cancel(self, target: Job) -> Job: ...
    @overload
    async def cancel(self, target: Batch) -> Batch: ...

    async def cancel(self, target: Job | Batch) -> Job | Batch:
        return await (self.cancel_batch(target) if isinstance(target, Batch) else self.cancel_job(target))

    @overload
    async def wait(self, target: Job, *, progress: ProgressCallback | None = ..., timeout_s: float | None = ...,
                   poll_s: float = ..., max_poll_s: float = ...) -> Job: ...
    @overload
    async def wait(self, target: Batch, *, progress: ProgressCallback | None = ..., timeout_s: float | None = ...,
                   poll_s: float = ..., max_poll_s: float = ...) -> Batch: ...

    async def wait(self, target: Job | Batch, *, progress: ProgressCallback | None = None,
                   timeout_s: float | None = None, poll_s: float = 0.5, max_poll_s: float = 5.0) -> Job | Batch:
        """Poll until the job finishes or the batch completes (see ``Client.wait``)."""
        poller = Poller(poll_s, max_poll_s, timeout_s, progress, time.monotonic())
        current = target
        while not poller.seen(current):
            delay = poller.next_delay(time.monotonic())
            if delay is None:
                raise WaitTimeout(timeout_message(current, timeout_s), current)
            await asyncio.sleep(delay)
            current = await (self.get_batch(current.id) if isinstance(current, Batch) else self.get_job(current.id))
        return current

    # Provenance and re-run

    async def get_provenance(self, job: str | Job) -> Provenance:
        """What made a finished job's output (see ``Client.get_provenance``); a 409
        ``provenance_not_recorded`` ``ApiError`` until a GPU worker finished it."""
        return Provenance.from_json(await self._json(calls.get(f"{calls.job_path(job)}/provenance")))

    async def rerun(self, job: str | Job, *, seed: int | None = None, num_timesteps: int | None = None,
                    cfg_text_scale: float | None = None, cfg_img_scale: float | None = None,
                    idempotency_key: str | None = None) -> Job:
        """The job's request again as a new job linked by ``rerun_of`` (see ``Client.rerun``)."""
        return Job.from_json(await self._json(calls.rerun(
            job, seed=seed, num_timesteps=num_timesteps, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
            idempotency_key=idempotency_key)))

    # Results

    async def result_bytes(self, job: str | Job) -> bytes:
        """A succeeded job's image (a fresh URL is fetched when the job's has expired)."""
        current = job if isinstance(job, Job) else await self.get_job(job)
        call = calls.download(current, fresh=not isinstance(job, Job))
        if call is None:
            call = calls.download(await self.get_job(current.id), fresh=True)
        assert call is not None  # fresh=True returns a call or raises
        return (await self._send(call)).content

    async def download(self, job: str | Job, dest: str | os.PathLike[str]) -> Path:
        """Write a succeeded job's image to ``dest`` (a file, or ``<job id>.png`` in a folder)."""
        current = job if isinstance(job, Job) else await self.get_job(job)
        data = await self.result_bytes(current)
        return await asyncio.to_thread(calls.write_atomically, calls.download_path(current, dest), data)

    # Sharing

    async def share_batch(self, batch: str | Batch, *, expires_in_s: int | None = None) -> Share:
        """A link to the batch's gallery page (results, live progress, a zip of all) that works
        without an API key until it expires: ``expires_in_s`` from 60 s to 30 days, default 7 days."""
        return Share.from_json(await self._json(calls.share_batch(batch, expires_in_s)))

    # Webhook deliveries

    async def list_deliveries(self, *, event: str | None = None, status: str | None = None,
                              job_id: str | None = None, batch_id: str | None = None,
                              created_after: datetime | None = None, created_before: datetime | None = None,
                              page_size: int = calls.LIST_PAGE_SIZE) -> AsyncIterator[Delivery]:
        """The tenant's webhook deliveries with every attempt, newest first (``async for``)."""
        params = calls.list_params(created_after, created_before, page_size, event=event, status=status,
                                   job_id=job_id, batch_id=batch_id)
        async for body in self._pages("/v1/webhooks/deliveries", params):
            yield Delivery.from_json(body)

    async def get_delivery(self, delivery_id: str) -> Delivery:
        return Delivery.from_json(await self._json(calls.get(calls.delivery_path(delivery_id))))

    async def replay_delivery(self, delivery_id: str, *, idempotency_key: str | None = None) -> Delivery:
        """Send a delivered or failed delivery again (the same ``webhook-id``)."""
        return Delivery.from_json(await self._json(calls.replay_delivery(delivery_id, idempotency_key)))

    async def send_test_webhook(self, url: str, *, idempotency_key: str | None = None) -> Delivery:
        """Queue a signed ``webhook.test`` ping to ``url``."""
        return Delivery.from_json(await self._json(calls.webhook_ping(url, idempotency_key)))
