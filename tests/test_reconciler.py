"""The reconciler process: the database, not the broker, is the source of truth.

A real ``reconciler`` process (its dispatcher) recovers chunks whose messages were lost when the
broker was flushed — publishing again only the lost ones — and every job still succeeds exactly
once; single passes (``reconcile_once``, real DB, broker and storage) return jobs whose lease
expired to waiting (for the dispatcher), fail jobs whose attempts are used up, and expire old
results.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select, update

from tests.fixtures.worker import Stack, flush_broker, job_rows, submit_jobs, wait_jobs, wait_until
from worker import chunks, dispatch, jobs
from worker.models import Chunk, Job, WebhookDelivery, Worker, WorkerState, utcnow
from worker.queues import GPU_QUEUE
from worker.reconciler import reconcile_once
from worker.storage import make_store

DONE = {"succeeded", "failed", "canceled"}
FAKE_WORKER = "fake-gpu-worker"


def _keep_fake_worker_alive(stack: Stack) -> None:
    """A ready GPU worker row, just heard from: the dispatcher counts it (a window of chunks)
    though no process consumes them."""
    now = utcnow()
    with stack.session() as s:
        s.execute(delete(Worker).where(Worker.id == FAKE_WORKER))
        s.add(Worker(id=FAKE_WORKER, state=WorkerState.ready, started_at=now, last_seen=now))
        s.commit()


def _chunks(stack: Stack) -> list[Chunk]:
    with stack.session() as s:
        return list(s.scalars(select(Chunk).order_by(Chunk.created_at)).all())


def _chunk_ids(stack: Stack, job_ids: list[str]) -> set[str | None]:
    return {r.chunk_id for r in job_rows(stack, job_ids)}


def test_dispatcher_republishes_only_the_lost_chunks_after_the_broker_is_flushed(stack: Stack) -> None:
    hook = "http://127.0.0.1:9/hook"  # no webhook worker: the outbox rows count the outcomes
    _keep_fake_worker_alive(stack)
    lost = submit_jobs(stack, 8, steps=2, webhook_url=hook)  # chunk_size 4: two chunks
    reconciler = stack.start("reconciler")

    def dispatched() -> bool:
        _keep_fake_worker_alive(stack)  # one live worker: a window of two chunks
        rows = _chunks(stack)
        return (len(rows) == 2 and all(c.published_at is not None for c in rows)
                and dispatch.queue_length(stack.settings, GPU_QUEUE) == 2)

    wait_until(dispatched, 60, 0.1, "two chunks formed and published")
    lost_chunks = {c.id for c in _chunks(stack)}
    assert _chunk_ids(stack, lost.job_ids) == lost_chunks
    flush_broker(stack)  # every message is gone before a worker took one; the rows still say queued
    with stack.session() as s:  # the fake worker goes away: no more chunks until a real one registers
        s.execute(delete(Worker).where(Worker.id == FAKE_WORKER))
        s.commit()
    assert dispatch.queue_length(stack.settings, GPU_QUEUE) == 0
    assert {r.status for r in job_rows(stack, lost.job_ids)} == {"queued"}
    late = submit_jobs(stack, 4, steps=2, webhook_url=hook, tenant_id=lost.tenant_id)  # after the flush
    stack.start("gpu")

    rows = wait_jobs(stack, lost.job_ids + late.job_ids, DONE, timeout_s=120)
    assert {r.status for r in rows} == {"succeeded"}
    assert {r.attempts for r in rows} == {1}
    with stack.session() as s:
        succeeded = s.execute(select(WebhookDelivery.job_id, func.count())
                              .where(WebhookDelivery.event == "job.succeeded")
                              .group_by(WebhookDelivery.job_id)).all()
    assert sorted(succeeded) == sorted((job_id, 1) for job_id in lost.job_ids + late.job_ids)  # each once

    counts = {c.id: c.publish_count for c in _chunks(stack)}
    late_chunks = _chunk_ids(stack, late.job_ids)
    assert late_chunks.isdisjoint(lost_chunks)
    # the lost chunks were published again, once each (twice at most); the others never
    assert all(counts[cid] == 2 for cid in lost_chunks), counts
    assert all(counts[cid] == 1 for cid in late_chunks), counts
    assert "lost from the broker" in reconciler.log()


def test_pass_requeues_expired_leases_and_fails_exhausted_jobs(stack: Stack) -> None:
    sub = submit_jobs(stack, 2, steps=2)
    store = make_store(stack.settings)
    with stack.session() as s:
        chunk_id = chunks.form_chunk(s, sub.job_ids, utcnow())
        s.commit()
        chunks.claim_chunk(s, chunk_id, "dead-worker", 60)
        past = utcnow() - timedelta(seconds=1)
        s.execute(update(Job).where(Job.id == sub.job_ids[0]).values(lease_until=past))
        s.execute(update(Job).where(Job.id == sub.job_ids[1]).values(lease_until=past, attempts=3))
        s.commit()
    report = reconcile_once(stack.settings, stack.session, store)
    assert report.requeued == 2 and report.errors == 0
    first, second = job_rows(stack, sub.job_ids)
    assert (first.status, first.lease_owner, first.error_code) == ("queued", None, "lease_expired")
    assert first.chunk_id is None and first.not_before is None  # waiting, for the dispatcher at once
    assert (second.status, second.error_code) == ("failed", "lease_expired")
    assert "dead-worker" in second.error_message
    assert dispatch.queue_length(stack.settings, GPU_QUEUE) == 0  # the reconciler publishes nothing
    with stack.session() as s:  # the dead worker's chunk has no active job left: the dispatcher closes it
        assert chunks.close_idle_chunks(s, utcnow()) == 1
    again = reconcile_once(stack.settings, stack.session, store)
    assert again.requeued == 0 and again.errors == 0


def test_pass_expires_results_past_retention(stack: Stack) -> None:
    sub = submit_jobs(stack, 1, steps=2)
    store = make_store(stack.settings)
    key = f"results/{sub.tenant_id}/{sub.job_ids[0]}.png"
    store.put(key, b"png bytes", "image/png")
    with stack.session() as s:
        chunk_id = chunks.form_chunk(s, sub.job_ids, utcnow())
        s.commit()
        chunks.claim_chunk(s, chunk_id, "w", 60)
        jobs.complete_job(s, sub.job_ids[0], "w", output_key=key, model_seconds=0.1)
        s.execute(update(Job).values(finished_at=utcnow() - timedelta(seconds=stack.settings.result_retention_s + 5)))
        s.commit()
    report = reconcile_once(stack.settings, stack.session, store)
    assert report.expired == 1
    assert not store.exists(key)
    assert job_rows(stack, sub.job_ids)[0].result_expired_at is not None
    assert reconcile_once(stack.settings, stack.session, store).expired == 0
