"""The GPU worker as a real Celery worker process running the tiny real engine, on both stacks
(PostgreSQL + Redis + S3 and SQLite + embedded broker + local folder), fed by a real
``reconciler`` process (its dispatcher forms the chunks from waiting jobs and publishes them).

Covers: a chunk runs end to end (dispatch → claim → engine → upload → succeeded, progress,
timings, webhook outbox); every finished chunk keeps its GPU time; a bad input fails at once
without a retry; a storage outage spends no attempt — the worker blocks, keeps an output it could
not upload, and the job succeeds once storage is back, or fails as ``dependency_outage`` past
the outage budget; cancellation between
denoising steps; SIGKILL mid-chunk → lease expiry → another worker finishes with one result;
SIGTERM mid-chunk (``drain=release``) → leases released → another worker finishes.
"""

from __future__ import annotations

import io
import signal
from collections.abc import Callable

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.fixtures.worker import Stack, free_port, job_rows, submit_jobs, wait_jobs, wait_until
from worker import jobs, tenants
from worker.models import Chunk, WebhookDelivery, Worker
from worker.dev.receiver import WebhookReceiver
from worker.storage import make_store, output_key

DONE = {"succeeded", "failed", "canceled"}
LONG_STEPS = 200  # ~7 s of denoising at 512 px (33 ms a step on 2 cores): room to interrupt it
LONG_PX = 512


def _bad_storage_env(stack: Stack) -> dict[str, str]:
    """Environment that makes the worker's storage refuse every write."""
    if stack.settings.storage_backend == "s3":
        return {"BAGEL_JOBS_S3_SECRET_ACCESS_KEY": "wrong-secret"}
    blocker = stack.tmp / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    return {"BAGEL_JOBS_STORAGE_DIR": str(blocker)}


def test_chunk_runs_through_the_engine_and_records_everything(stack: Stack, receiver: WebhookReceiver) -> None:
    stack.start("gpu")
    stack.start("reconciler")
    sub = submit_jobs(stack, 3, steps=2, px=32, webhook_url=receiver.url)
    rows = wait_jobs(stack, sub.job_ids, DONE)
    assert len({row.chunk_id for row in rows}) == 1  # alike jobs (chunk_size 4): one chunk, one engine call
    store = make_store(stack.settings)
    for row in rows:
        assert row.status == "succeeded", (row.error_code, row.error_message)
        assert row.attempts == 1 and row.lease_owner is not None
        assert row.output_key == output_key(sub.tenant_id, row.id, "png")
        assert row.progress_step == row.progress_total >= 1  # the engine counts Euler steps (timesteps − 1)
        assert row.model_seconds > 0 and row.started_at <= row.finished_at
        img = Image.open(io.BytesIO(store.get(row.output_key)))
        assert img.size == (32, 32)
    with stack.session() as s:
        events = sorted(s.scalars(select(WebhookDelivery.event)).all())
    assert events == ["batch.completed"] + ["job.succeeded"] * 3

    def finished_chunk() -> Chunk | None:
        with stack.session() as s:
            chunk = s.get(Chunk, rows[0].chunk_id)
        return chunk if chunk.finished_at is not None else None

    chunk = wait_until(finished_chunk, 30, 0.1, "the chunk to be finished")  # its window slot is free again
    assert chunk.job_count == 3 and chunk.publish_count == 1 and chunk.claimed_by == rows[0].lease_owner
    assert all(row.gpu_seconds > 0 for row in rows)  # each job's share of the chunk's engine time


def test_every_finished_chunk_records_its_gpu_time(stack: Stack) -> None:
    stack.start("gpu")
    stack.start("reconciler")
    subs = [submit_jobs(stack, 1, steps=2, px=px) for px in (32, 48, 64, 80)]  # four sizes: four chunks
    rows = wait_jobs(stack, [job_id for sub in subs for job_id in sub.job_ids], DONE)
    assert {row.status for row in rows} == {"succeeded"}

    def finished() -> list[Chunk] | None:
        with stack.session() as s:
            chunks = list(s.scalars(select(Chunk)).all())
        return chunks if len(chunks) == 4 and all(c.finished_at is not None for c in chunks) else None

    chunks = wait_until(finished, 30, 0.1, "every chunk to be finished")
    # the worker's finish_chunk records the engine time; the dispatcher closing an idle chunk must not lose it
    assert [(c.id, c.finished_at, c.gpu_seconds) for c in chunks if not c.gpu_seconds] == []


def test_bad_input_fails_at_once_without_retry(stack: Stack) -> None:
    stack.start("gpu")
    stack.start("reconciler")
    good = submit_jobs(stack, 1, steps=2)
    with stack.session() as s:  # an input file that exists in the DB but not in storage
        f = jobs.add_file(s, good.tenant_id, sha256="0" * 64, storage_key=f"inputs/{good.tenant_id}/{'0' * 64}",
                          content_type="image/png", fmt="PNG", width=32, height=32, size_bytes=10, filename=None)
    bad = submit_jobs(stack, 1, task="edit", input_file_ids=(f.id,), tenant_id=good.tenant_id)
    [row] = wait_jobs(stack, bad.job_ids, DONE)
    assert (row.status, row.attempts, row.error_code) == ("failed", 1, "unknown_file")
    assert "input_file_ids[0]" in row.error_message and "missing from storage" in row.error_message
    assert wait_jobs(stack, good.job_ids, DONE)[0].status == "succeeded"


def test_undecodable_input_fails_with_the_engine_code(stack: Stack) -> None:
    stack.start("gpu")
    stack.start("reconciler")
    with stack.session() as s:
        tenant_id = tenants.create_tenant(s, "undecodable").id
    store = make_store(stack.settings)
    key = f"inputs/{tenant_id}/{'1' * 64}"
    store.put(key, b"\x89PNG\r\n\x1a\n but truncated", "image/png")
    with stack.session() as s:
        f = jobs.add_file(s, tenant_id, sha256="1" * 64, storage_key=key, content_type="image/png", fmt="PNG",
                          width=32, height=32, size_bytes=20, filename=None)
    bad = submit_jobs(stack, 1, task="edit", input_file_ids=(f.id,), tenant_id=tenant_id)
    [row] = wait_jobs(stack, bad.job_ids, DONE)
    assert (row.status, row.attempts, row.error_code) == ("failed", 1, "invalid_input")
    assert row.error_message.startswith("input_file_ids[0]:")


def _worker_state(stack: Stack) -> str | None:
    with stack.session() as s:
        states = s.scalars(select(Worker.state)).all()
    return str(states[0]) if len(states) == 1 else None


def test_a_storage_outage_past_the_budget_fails_the_job_as_such_without_spending_attempts(stack: Stack) -> None:
    port = free_port()
    worker = stack.start("gpu", extra_env={**_bad_storage_env(stack), "BAGEL_JOBS_OUTAGE_BUDGET_S": "8",
                                           "BAGEL_JOBS_WORKER_HTTP_PORT": str(port)})
    stack.start("reconciler")
    sub = submit_jobs(stack, 1, steps=2)
    wait_until(lambda: _worker_state(stack) == "blocked", 60, what="the worker to block")
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.text.startswith("blocked: storage unreachable")
    [row] = wait_jobs(stack, sub.job_ids, DONE, timeout_s=90)
    assert (row.status, row.attempts, row.error_code) == ("failed", 1, "dependency_outage")
    assert "outage budget" in row.error_message and row.output_key is None
    log = worker.log()
    assert log.count(": claimed 1 job(s) as") == 1 and "output(s) kept until storage answers" in log  # computed once


def _take_storage_away(stack: Stack) -> Callable[[], None]:
    """The local storage folder disappears (a file stands in its place: every read and write
    fails) until the returned function gives it back."""
    root = stack.settings.storage_dir
    away = root.with_name(root.name + ".away")
    root.rename(away)
    root.write_text("storage is away")

    def give_back() -> None:
        root.unlink()
        away.rename(root)

    return give_back


@pytest.mark.parametrize("path", ["input-read", "upload"])
def test_a_storage_outage_costs_no_attempt_and_computes_nothing_twice(stack: Stack, path: str) -> None:
    if stack.kind != "sqlite":
        pytest.skip("a local folder can be taken away and given back; S3 going down is in test_faults.py")
    worker = stack.start("gpu")
    stack.start("reconciler")
    with stack.session() as s:
        tenant_id = tenants.create_tenant(s, "outage").id
    if path == "input-read":
        data = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(data, "PNG")
        key = f"inputs/{tenant_id}/{'2' * 64}"
        make_store(stack.settings).put(key, data.getvalue(), "image/png")
        with stack.session() as s:
            f = jobs.add_file(s, tenant_id, sha256="2" * 64, storage_key=key, content_type="image/png",
                              fmt="PNG", width=32, height=32, size_bytes=len(data.getvalue()), filename=None)
        give_back = _take_storage_away(stack)
        sub = submit_jobs(stack, 1, task="edit", input_file_ids=(f.id,), tenant_id=tenant_id)
        # the input cannot be read: the job waits again, its attempt given back, the worker blocks
        wait_until(lambda: (lambda r: r.status == "queued" and r.deferrals >= 1)(job_rows(stack, sub.job_ids)[0]),
                   60, what="the job to wait for storage")
        waiting = job_rows(stack, sub.job_ids)[0]
        assert (waiting.attempts, waiting.error_code, waiting.chunk_id) == (0, "storage_unavailable", None)
        assert waiting.not_before > waiting.updated_at and waiting.outage_since is not None
    else:
        give_back = _take_storage_away(stack)
        sub = submit_jobs(stack, 1, steps=2, tenant_id=tenant_id)
        wait_until(lambda: "output(s) kept until storage answers" in worker.log(), 60,
                   what="the output to be kept")
        assert job_rows(stack, sub.job_ids)[0].status == "running"  # its lease kept while it waits
    wait_until(lambda: _worker_state(stack) == "blocked", 60, what="the worker to block")
    give_back()
    [row] = wait_jobs(stack, sub.job_ids, DONE, timeout_s=90)
    assert (row.status, row.attempts) == ("succeeded", 1), (row.error_code, row.error_message)
    assert make_store(stack.settings).exists(row.output_key)
    wait_until(lambda: _worker_state(stack) == "ready", 30, what="the worker to take chunks again")
    claims = worker.log().count(": claimed 1 job(s) as")
    assert claims == (2 if path == "input-read" else 1)  # an upload waits; only an unread input is run again


def test_cancel_stops_a_running_job_between_denoising_steps(stack: Stack) -> None:
    stack.start("gpu")
    stack.start("reconciler")
    sub = submit_jobs(stack, 1, steps=LONG_STEPS, px=LONG_PX)
    wait_until(lambda: job_rows(stack, sub.job_ids)[0].progress_step >= 2, 60, 0.02, "denoising to start")
    with stack.session() as s:
        jobs.cancel_job(s, sub.tenant_id, sub.job_ids[0])
    [row] = wait_jobs(stack, sub.job_ids, DONE)
    assert row.status == "canceled"
    assert row.progress_step < LONG_STEPS and row.output_key is None


def test_killed_worker_loses_its_lease_and_another_finishes_with_one_result(
        stack: Stack, receiver: WebhookReceiver) -> None:
    first = stack.start("gpu")
    stack.start("reconciler")
    sub = submit_jobs(stack, 1, steps=LONG_STEPS, px=LONG_PX, webhook_url=receiver.url)
    wait_until(lambda: job_rows(stack, sub.job_ids)[0].progress_step >= 2, 60, 0.02, "denoising to start")
    owner = job_rows(stack, sub.job_ids)[0].lease_owner
    first.kill()  # SIGKILL: no chance to release anything
    stack.start("gpu")
    [row] = wait_jobs(stack, sub.job_ids, DONE, timeout_s=240)  # 200 steps at 512 px, on a loaded machine
    assert row.status == "succeeded" and row.attempts == 2
    assert row.lease_owner != owner
    with stack.session() as s:
        assert s.scalar(select(func.count()).select_from(WebhookDelivery)
                        .where(WebhookDelivery.event == "job.succeeded")) == 1
    assert make_store(stack.settings).exists(output_key(sub.tenant_id, row.id, "png"))


def test_sigterm_releases_the_running_chunk_for_another_worker(stack: Stack) -> None:
    first = stack.start("gpu", extra_env={"BAGEL_JOBS_DRAIN": "release"})
    stack.start("reconciler")
    sub = submit_jobs(stack, 1, steps=LONG_STEPS, px=LONG_PX)
    wait_until(lambda: job_rows(stack, sub.job_ids)[0].progress_step >= 2, 60, 0.02, "denoising to start")
    first.signal(signal.SIGTERM)
    assert first.popen.wait(30) == 0
    assert "released 1 job(s)" in first.log()
    row = job_rows(stack, sub.job_ids)[0]
    # waiting again, out of its chunk; no live worker is left, so the dispatcher holds it back
    assert (row.status, row.chunk_id, row.attempts, row.lease_owner) == ("queued", None, 0, None)
    stack.start("gpu")
    [row] = wait_jobs(stack, sub.job_ids, DONE, timeout_s=240)  # 200 steps at 512 px, on a loaded machine
    assert row.status == "succeeded" and row.attempts == 1  # the released attempt does not count
