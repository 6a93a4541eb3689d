"""The reconciler: the database, not the broker, is the source of truth.

A real reconciler process recovers jobs whose messages were lost when the broker was flushed;
single passes (``reconcile_once``, real DB, broker and storage) requeue expired leases, fail
jobs whose attempts are used up, and expire old results.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from tests.fixtures.worker import Stack, flush_broker, job_rows, submit_jobs, wait_jobs
from worker import dispatch, jobs
from worker.celery_app import GPU_QUEUE
from worker.models import Chunk, Job, utcnow
from worker.reconciler import reconcile_once
from worker.storage import make_store

DONE = {"succeeded", "failed", "canceled"}


def test_reconciler_republishes_chunks_after_the_broker_is_flushed(stack: Stack) -> None:
    sub = submit_jobs(stack, 3, steps=2)
    assert dispatch.queue_length(stack.settings, GPU_QUEUE) == len(sub.chunk_ids)
    flush_broker(stack)  # every message is gone; the rows still say queued
    assert dispatch.queue_length(stack.settings, GPU_QUEUE) == 0
    stack.start("gpu")
    assert {r.status for r in job_rows(stack, sub.job_ids)} == {"queued"}
    stack.start("reconciler")
    rows = wait_jobs(stack, sub.job_ids, DONE, timeout_s=90)
    assert {r.status for r in rows} == {"succeeded"}
    assert {r.attempts for r in rows} == {1}
    with stack.session() as s:
        counts = s.scalars(select(Chunk.publish_count).where(Chunk.id.in_(sub.chunk_ids))).all()
    assert all(c >= 2 for c in counts)


def test_pass_requeues_expired_leases_and_fails_exhausted_jobs(stack: Stack) -> None:
    sub = submit_jobs(stack, 2, steps=2, publish=False)
    store = make_store(stack.settings)
    with stack.session() as s:
        jobs.claim_chunk(s, sub.chunk_ids[0], "dead-worker", 60)
        past = utcnow() - timedelta(seconds=1)
        s.execute(update(Job).where(Job.id == sub.job_ids[0]).values(lease_until=past))
        s.execute(update(Job).where(Job.id == sub.job_ids[1]).values(lease_until=past, attempts=3))
        s.commit()
    report = reconcile_once(stack.settings, stack.session, store)
    assert report.requeued == 2 and report.republished == 1 and report.errors == 0
    first, second = job_rows(stack, sub.job_ids)
    assert (first.status, first.lease_owner, first.error_code) == ("queued", None, "lease_expired")
    assert (second.status, second.error_code) == ("failed", "lease_expired")
    assert "dead-worker" in second.error_message
    assert dispatch.queue_length(stack.settings, GPU_QUEUE) == 1
    again = reconcile_once(stack.settings, stack.session, store)  # just published: no duplicate yet
    assert again.requeued == 0 and again.republished == 0


def test_pass_expires_results_past_retention(stack: Stack) -> None:
    sub = submit_jobs(stack, 1, steps=2, publish=False)
    store = make_store(stack.settings)
    key = f"results/{sub.tenant_id}/{sub.job_ids[0]}.png"
    store.put(key, b"png bytes", "image/png")
    with stack.session() as s:
        jobs.claim_chunk(s, sub.chunk_ids[0], "w", 60)
        jobs.complete_job(s, sub.job_ids[0], "w", output_key=key, model_seconds=0.1)
        s.execute(update(Job).values(finished_at=utcnow() - timedelta(seconds=stack.settings.result_retention_s + 5)))
        s.commit()
    report = reconcile_once(stack.settings, stack.session, store)
    assert report.expired == 1
    assert not store.exists(key)
    assert job_rows(stack, sub.job_ids)[0].result_expired_at is not None
    assert reconcile_once(stack.settings, stack.session, store).expired == 0
