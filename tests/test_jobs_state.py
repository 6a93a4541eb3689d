"""The job state machine (worker.jobs) on real PostgreSQL and SQLite: submission (jobs wait,
no chunk), chunk formation by the dispatcher, leases, outbox, batch completion, retries (back
to waiting, not handed out before their backoff), reconciler queries, idle chunks closed,
cancellation, webhook delivery bookkeeping.

Most tests form their chunks with ``chunks.form_chunk`` (what the dispatcher does for the jobs it
picks); the ones about the dispatcher's choices run ``Dispatcher.dispatch_once`` against a live
``workers`` row and a private embedded broker."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from worker import chunks, dispatch, jobs, outbox, queries, tenants
from worker.db import session_factory
from worker.jobs import JobSpec
from worker.models import (
    Batch,
    Chunk,
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    Worker,
    WorkerState,
    utcnow,
)
from worker.queues import GPU_QUEUE
from worker.scheduler import Dispatcher

HOOK = "http://127.0.0.1:9/hook"


def spec(task: str = "edit", prompt: str = "a mug on a desk", files: tuple[str, ...] = ("f1",),
         **kw: object) -> JobSpec:
    return JobSpec(task=task, prompt=prompt, params={"num_timesteps": 4, "seed": 1},
                   input_file_ids=files, **kw)


@pytest.fixture
def tenant_id(db_session: Session) -> str:
    return tenants.create_tenant(db_session, "acme").id


def deliveries(session: Session, event: str | None = None) -> list[WebhookDelivery]:
    q = select(WebhookDelivery).order_by(WebhookDelivery.created_at)
    if event:
        q = q.where(WebhookDelivery.event == event)
    rows = list(session.scalars(q.execution_options(populate_existing=True)).all())
    session.commit()
    return rows


def submit_batch(session: Session, tenant_id: str, specs: list[JobSpec], max_attempts: int = 3,
                 webhook_url: str | None = HOOK):
    return jobs.submit(session, tenant_id, specs, batch=True, webhook_url=webhook_url, metadata={"sku": "X1"},
                       max_attempts=max_attempts)


def chunk_of(session: Session, job_ids: list[str]) -> str:
    """What the dispatcher does for the jobs it picks: a new chunk taking them, committed."""
    chunk_id = chunks.form_chunk(session, job_ids, utcnow())
    session.commit()
    assert chunk_id is not None
    return chunk_id


def add_live_worker(session: Session, worker_id: str = "gpu-1") -> None:
    """A GPU worker row as a registered, ready, just-heard-from worker keeps it."""
    now = utcnow()
    session.add(Worker(id=worker_id, state=WorkerState.ready, started_at=now, last_seen=now))
    session.commit()


def run_pass(dispatcher: Dispatcher, session: Session):
    """One dispatcher pass, after ending the test session's transaction (on SQLite every
    transaction, a read too, holds the database's write lock)."""
    session.commit()
    return dispatcher.dispatch_once()


@pytest.fixture
def dispatcher(db_session: Session, db_kind: str, make_settings) -> Dispatcher:
    """A dispatcher on the test's database, publishing to a private embedded broker; chunks of
    at most 3 jobs and a window wide enough for every test here."""
    settings = make_settings(db=db_kind, chunk_size=3, window_per_worker=16)
    return Dispatcher(settings, session_factory(db_session.get_bind()), "dispatcher-under-test")


def test_submit_leaves_jobs_waiting_and_the_dispatcher_groups_them_by_shared_inputs(db_session, tenant_id,
                                                                                     dispatcher):
    specs = [spec(files=("a",)) for _ in range(5)] + [spec(files=("b",)) for _ in range(2)] + [
        spec(task="generate", files=(), width=64, height=64), spec(files=("a",), think=True)]
    batch, rows = submit_batch(db_session, tenant_id, specs)
    assert batch is not None and batch.job_count == 9
    assert all(j.status == JobStatus.queued and j.attempts == 0 and j.batch_id == batch.id for j in rows)
    assert all(j.chunk_id is None for j in rows)  # waiting: no chunk, nothing published
    assert db_session.scalars(select(Chunk)).all() == []
    assert rows[0].progress_total == 3  # 4 timesteps = 3 Euler steps
    assert len({j.chunk_key for j in rows[:5]}) == 1 and len({j.chunk_key for j in rows}) == 4

    # No live GPU worker: the dispatcher forms nothing.
    idle = run_pass(dispatcher, db_session)
    assert idle.leader and idle.live_workers == 0 and idle.formed == 0 and idle.published == 0
    assert all(j.chunk_id is None for j in queries.load_jobs(db_session, [j.id for j in rows]))

    add_live_worker(db_session)
    report = run_pass(dispatcher, db_session)
    # a×5 → 3+2, b×2 → 2, generate → 1, a+think → 1 (chunk_size 3)
    assert (report.live_workers, report.formed, report.published) == (1, 5, 5)
    by_chunk: dict[str, list[int]] = {}
    for job in queries.load_jobs(db_session, [j.id for j in rows]):
        assert job.status == JobStatus.queued and job.chunk_id is not None
        by_chunk.setdefault(job.chunk_id, []).append(job.position)
    assert sorted(by_chunk.values()) == [[0, 1, 2], [3, 4], [5, 6], [7], [8]]
    stored = db_session.scalars(select(Chunk).execution_options(populate_existing=True)).all()
    assert {c.id for c in stored} == set(by_chunk)
    assert all(c.published_at is not None and c.publish_count == 1 and c.job_count == len(by_chunk[c.id])
               for c in stored)
    assert dispatch.queue_length(dispatcher.settings, GPU_QUEUE) == 5  # one message per chunk
    again = run_pass(dispatcher, db_session)  # nothing waits any more, nothing is lost
    assert (again.formed, again.published, again.republished) == (0, 0, 0)


def test_claim_is_exclusive_and_repeat_claims_take_nothing(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec() for _ in range(3)])
    chunk_id = chunk_of(db_session, [j.id for j in rows])
    claimed = chunks.claim_chunk(db_session, chunk_id, "w1", lease_s=60)
    assert [j.id for j in claimed] == [j.id for j in rows]
    assert all(j.status == JobStatus.running and j.attempts == 1 and j.lease_owner == "w1" for j in claimed)
    assert all(j.lease_until > utcnow() + timedelta(seconds=50) for j in claimed)
    chunk = db_session.get(Chunk, chunk_id, populate_existing=True)
    assert chunk.claimed_by == "w1" and chunk.claimed_at is not None and chunk.finished_at is None
    assert chunks.claim_chunk(db_session, chunk_id, "w2", lease_s=60) == []
    assert chunks.claim_chunk(db_session, chunk_id, "w1", lease_s=60) == []
    again = queries.load_jobs(db_session, [j.id for j in rows])
    assert all(j.attempts == 1 and j.lease_owner == "w1" for j in again)


def test_concurrent_claims_split_nothing_and_lose_nothing(db_session, db_url, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec() for _ in range(6)])
    chunk_id = chunk_of(db_session, [j.id for j in rows])
    factory = session_factory(db_session.get_bind())
    results: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def claim(worker: str) -> None:
        with factory() as s:
            barrier.wait()
            results[worker] = [j.id for j in chunks.claim_chunk(s, chunk_id, worker, lease_s=60)]

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [w for w, ids in results.items() if ids]
    assert len(results) == 4 and len(winners) == 1
    assert sorted(results[winners[0]]) == sorted(j.id for j in rows)


def test_complete_needs_the_lease_and_writes_the_outbox_row_once(db_session, tenant_id):
    _, rows = jobs.submit(db_session, tenant_id, [spec()], batch=False, webhook_url=HOOK, metadata={"k": "v"})
    job_id = rows[0].id
    assert not jobs.complete_job(db_session, job_id, "w1", output_key="k.png", model_seconds=1.0)  # not claimed
    chunks.claim_chunk(db_session, chunk_of(db_session, [job_id]), "w1", lease_s=60)
    assert not jobs.complete_job(db_session, job_id, "intruder", output_key="k.png", model_seconds=1.0)
    assert deliveries(db_session) == []
    assert jobs.complete_job(db_session, job_id, "w1", output_key="results/t/j.png", think_text="hmm",
                             model_seconds=2.5)
    assert not jobs.complete_job(db_session, job_id, "w1", output_key="other.png", model_seconds=9.0)
    job = queries.get_job(db_session, tenant_id, job_id)
    assert job.status == JobStatus.succeeded and job.output_key == "results/t/j.png"
    assert job.model_seconds == 2.5 and job.think_text == "hmm" and job.finished_at is not None
    assert job.lease_until is None and job.progress_step == job.progress_total == 3
    [row] = deliveries(db_session)
    assert row.event == "job.succeeded" and row.url == HOOK and row.status == DeliveryStatus.pending
    assert row.id.startswith("msg_") and row.next_attempt_at is not None
    assert row.payload["type"] == "job.succeeded"
    assert row.payload["data"]["job_id"] == job_id
    assert row.payload["data"]["output_key"] == "results/t/j.png"
    assert row.payload["data"]["metadata"] == {"k": "v"}
    assert queries.batch_counts(db_session, "none") == {s.value: 0 for s in JobStatus}


def test_outbox_row_and_status_change_commit_together(db_session, db_kind, tenant_id):
    """When the outbox insert fails, the job is not marked succeeded either (one transaction)."""
    _, rows = jobs.submit(db_session, tenant_id, [spec()], batch=False, webhook_url=HOOK, metadata={})
    chunks.claim_chunk(db_session, chunk_of(db_session, [rows[0].id]), "w1", lease_s=60)
    if db_kind == "postgres":
        ddl = ["CREATE FUNCTION refuse_outbox() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'outbox down'; "
               "END $$ LANGUAGE plpgsql",
               "CREATE TRIGGER refuse_outbox BEFORE INSERT ON webhook_deliveries "
               "FOR EACH ROW EXECUTE FUNCTION refuse_outbox()"]
        cleanup = ["DROP TRIGGER refuse_outbox ON webhook_deliveries", "DROP FUNCTION refuse_outbox()"]
    else:
        ddl = ["CREATE TRIGGER refuse_outbox BEFORE INSERT ON webhook_deliveries "
               "BEGIN SELECT RAISE(ABORT, 'outbox down'); END"]
        cleanup = ["DROP TRIGGER refuse_outbox"]
    for stmt in ddl:
        db_session.execute(text(stmt))
    db_session.commit()
    try:
        with pytest.raises(Exception, match="outbox down"):
            jobs.complete_job(db_session, rows[0].id, "w1", output_key="x.png", model_seconds=1.0)
        db_session.rollback()
    finally:
        for stmt in cleanup:
            db_session.execute(text(stmt))
        db_session.commit()
    job = queries.load_jobs(db_session, [rows[0].id])[0]
    assert job.status == JobStatus.running and job.output_key is None
    assert jobs.complete_job(db_session, rows[0].id, "w1", output_key="x.png", model_seconds=1.0)
    assert len(deliveries(db_session, "job.succeeded")) == 1


def test_batch_completed_event_is_written_exactly_once_with_a_manifest(db_session, tenant_id):
    batch, rows = submit_batch(db_session, tenant_id, [spec(files=("a",)), spec(files=("a",)), spec(files=("b",))])
    chunks.claim_chunk(db_session, chunk_of(db_session, [rows[0].id, rows[1].id]), "w1", lease_s=60)
    assert jobs.complete_job(db_session, rows[0].id, "w1", output_key="r0.png", model_seconds=1)
    assert jobs.fail_job(db_session, rows[1].id, "w1", "invalid_input", "prompt: too long")
    assert deliveries(db_session, "batch.completed") == []
    assert queries.get_batch(db_session, tenant_id, batch.id).completed_at is None
    jobs.cancel_job(db_session, tenant_id, rows[2].id)  # queued → canceled finishes the batch
    jobs.cancel_job(db_session, tenant_id, rows[2].id)
    jobs.fail_job(db_session, rows[1].id, "w1", "x", "again")
    [event] = deliveries(db_session, "batch.completed")
    data = event.payload["data"]
    assert data["batch_id"] == batch.id and data["metadata"] == {"sku": "X1"}
    assert data["counts"] == {"queued": 0, "running": 0, "succeeded": 1, "failed": 1, "canceled": 1, "expired": 0}
    assert [(m["job_id"], m["status"], m["output_key"]) for m in data["jobs"]] == [
        (rows[0].id, "succeeded", "r0.png"), (rows[1].id, "failed", None), (rows[2].id, "canceled", None)]
    assert queries.get_batch(db_session, tenant_id, batch.id).completed_at is not None
    assert [d.event for d in deliveries(db_session)] == ["job.succeeded", "job.failed", "batch.completed"]
    assert queries.batch_progress(db_session, batch.id) == 1.0


def test_concurrent_completion_of_the_last_jobs_completes_the_batch_once(db_session, tenant_id):
    factory = session_factory(db_session.get_bind())
    for round_ in range(5):
        _, rows = submit_batch(db_session, tenant_id, [spec(files=(f"r{round_}",)) for _ in range(4)])
        for i in range(2):  # two chunks of two jobs, on two workers
            chunks.claim_chunk(db_session, chunk_of(db_session, [j.id for j in rows[2 * i:2 * i + 2]]), f"w{i}",
                             lease_s=60)
        owners = {j.id: j.lease_owner for j in queries.load_jobs(db_session, [j.id for j in rows])}
        barrier = threading.Barrier(len(rows))
        errors: list[BaseException] = []

        def finish(job_id: str) -> None:
            try:
                with factory() as s:
                    barrier.wait()
                    assert jobs.complete_job(s, job_id, owners[job_id], output_key=f"{job_id}.png", model_seconds=1)
            except BaseException as exc:  # noqa: BLE001 — reported below
                errors.append(exc)

        threads = [threading.Thread(target=finish, args=(j.id,)) for j in rows]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert len(deliveries(db_session, "batch.completed")) == round_ + 1


def test_retry_or_fail_requeues_until_attempts_run_out(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec()], max_attempts=2)
    job_id = rows[0].id
    first_chunk = chunk_of(db_session, [job_id])
    chunks.claim_chunk(db_session, first_chunk, "w1", lease_s=60)
    assert jobs.retry_or_fail(db_session, job_id, "other", "storage_unavailable", "S3 down") == "running"
    before = utcnow()
    assert jobs.retry_or_fail(db_session, job_id, "w1", "storage_unavailable", "S3 down", delay_s=30) == "queued"
    job = queries.load_jobs(db_session, [job_id])[0]
    assert job.attempts == 1 and job.lease_owner is None and job.error_code == "storage_unavailable"
    # back to waiting: out of its chunk, not to be handed out before the backoff
    assert job.status == JobStatus.queued and job.chunk_id is None and job.lease_until is None
    assert before + timedelta(seconds=29) <= job.not_before <= utcnow() + timedelta(seconds=31)
    assert deliveries(db_session) == []
    assert chunks.claim_chunk(db_session, first_chunk, "w2", lease_s=60) == []  # the job left that chunk
    [again] = chunks.claim_chunk(db_session, chunk_of(db_session, [job_id]), "w2", lease_s=60)
    assert again.attempts == 2
    assert jobs.retry_or_fail(db_session, job_id, "w2", "storage_unavailable", "S3 still down") == "failed"
    job = queries.load_jobs(db_session, [job_id])[0]
    assert job.status == JobStatus.failed and job.error_message == "S3 still down"
    assert [d.event for d in deliveries(db_session)] == ["job.failed", "batch.completed"]
    assert deliveries(db_session, "job.failed")[0].payload["data"]["error"] == {
        "code": "storage_unavailable", "message": "S3 still down"}


def test_a_retry_is_not_dispatched_before_its_backoff(db_session, tenant_id, dispatcher):
    _, rows = submit_batch(db_session, tenant_id, [spec(), spec(files=("b",))])
    add_live_worker(db_session)
    assert run_pass(dispatcher, db_session).formed == 2
    job_id, other_id = (j.id for j in rows)
    first_chunk = queries.load_jobs(db_session, [job_id])[0].chunk_id
    chunks.claim_chunk(db_session, first_chunk, "w1", lease_s=60)
    assert jobs.retry_or_fail(db_session, job_id, "w1", "storage_unavailable", "S3 down", delay_s=30) == "queued"

    right_after = run_pass(dispatcher, db_session)  # the backoff has not passed: no chunk for it
    assert right_after.formed == 0 and right_after.closed == 1  # its old chunk has no active job left
    job = queries.load_jobs(db_session, [job_id])[0]
    assert job.status == JobStatus.queued and job.chunk_id is None and job.not_before > utcnow()
    assert db_session.get(Chunk, first_chunk, populate_existing=True).finished_at is not None
    assert queries.load_jobs(db_session, [other_id])[0].chunk_id is not None  # untouched

    db_session.execute(update(Job).where(Job.id == job_id).values(not_before=utcnow() - timedelta(seconds=1)))
    db_session.commit()  # the backoff is over
    later = run_pass(dispatcher, db_session)
    assert later.formed == 1 and later.chunk_jobs == [1]
    job = queries.load_jobs(db_session, [job_id])[0]
    assert job.chunk_id not in (None, first_chunk)
    [claimed] = chunks.claim_chunk(db_session, job.chunk_id, "w2", lease_s=60)
    assert claimed.id == job_id and claimed.attempts == 2

    # Without a delay (a device error gives the chunk back at once) the job is handed out on the next pass.
    assert jobs.retry_or_fail(db_session, job_id, "w2", "gpu_device_error", "gone", delay_s=0) == "queued"
    assert queries.load_jobs(db_session, [job_id])[0].not_before is None
    assert run_pass(dispatcher, db_session).formed == 1
    assert queries.load_jobs(db_session, [job_id])[0].chunk_id is not None


def test_requeue_expired_returns_jobs_then_fails_them_when_attempts_run_out(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec(), spec()], max_attempts=2)
    ids = [j.id for j in rows]
    first_chunk = chunk_of(db_session, ids)
    chunks.mark_published(db_session, [first_chunk])
    chunks.claim_chunk(db_session, first_chunk, "dead-worker", lease_s=30)
    assert jobs.requeue_expired(db_session, utcnow()) == 0  # leases still live
    later = utcnow() + timedelta(seconds=31)
    assert jobs.requeue_expired(db_session, later) == 2
    requeued = queries.load_jobs(db_session, ids)
    assert all(j.status == JobStatus.queued and j.lease_owner is None and j.error_code == "lease_expired"
               for j in requeued)
    assert all(j.chunk_id is None for j in requeued)  # waiting again, for the dispatcher
    assert chunks.close_idle_chunks(db_session, utcnow()) == 1  # the dead worker's chunk frees its slot
    # The dead worker wakes up late: it no longer holds the lease.
    assert not jobs.complete_job(db_session, rows[0].id, "dead-worker", output_key="x", model_seconds=1)
    chunks.claim_chunk(db_session, chunk_of(db_session, ids), "w2", lease_s=30)
    assert jobs.requeue_expired(db_session, utcnow() + timedelta(seconds=31)) == 2
    failed = queries.load_jobs(db_session, ids)
    assert all(j.status == JobStatus.failed and j.error_code == "lease_expired" for j in failed)
    assert "attempt 2 of 2" in failed[0].error_message
    assert len(deliveries(db_session, "job.failed")) == 2
    assert len(deliveries(db_session, "batch.completed")) == 1


def test_close_idle_chunks_finishes_only_chunks_without_an_active_job(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec(), spec(), spec(files=("b",)), spec(files=("c",))])
    done, returned, canceled = (chunk_of(db_session, [rows[0].id, rows[1].id]), chunk_of(db_session, [rows[2].id]),
                                chunk_of(db_session, [rows[3].id]))
    chunks.mark_published(db_session, [done])
    chunks.mark_published(db_session, [done])
    chunk = db_session.get(Chunk, done, populate_existing=True)
    assert chunk.publish_count == 2 and chunk.published_at is not None and chunk.job_count == 2
    assert chunks.close_idle_chunks(db_session, utcnow()) == 0  # every chunk holds a waiting job
    chunks.claim_chunk(db_session, done, "w1", lease_s=60)
    chunks.claim_chunk(db_session, returned, "w2", lease_s=60)
    assert chunks.close_idle_chunks(db_session, utcnow()) == 0  # running jobs are active too
    assert jobs.complete_job(db_session, rows[0].id, "w1", output_key="o.png", model_seconds=1)
    assert chunks.close_idle_chunks(db_session, utcnow()) == 0  # one job of the chunk still runs
    assert jobs.fail_job(db_session, rows[1].id, "w1", "invalid_input", "bad")
    assert jobs.release_jobs(db_session, [rows[2].id], "w2") == 1  # back to waiting, out of the chunk
    jobs.cancel_job(db_session, tenant_id, rows[3].id)
    assert chunks.close_idle_chunks(db_session, utcnow()) == 3
    assert chunks.close_idle_chunks(db_session, utcnow()) == 0
    finished = db_session.scalars(select(Chunk).execution_options(populate_existing=True)).all()
    assert len(finished) == 3 and all(c.finished_at is not None for c in finished)
    waiting = queries.load_jobs(db_session, [rows[2].id])[0]
    assert waiting.status == JobStatus.queued and waiting.chunk_id is None


def test_cancel_queued_is_immediate_and_running_is_cooperative(db_session, tenant_id):
    batch, rows = submit_batch(db_session, tenant_id, [spec(files=("a",)), spec(files=("b",))])
    own = [chunk_of(db_session, [j.id]) for j in rows]
    chunks.claim_chunk(db_session, own[0], "w1", lease_s=60)
    assert jobs.cancel_requested_ids(db_session, [j.id for j in rows]) == set()
    updated = jobs.cancel_batch(db_session, tenant_id, batch.id)
    assert updated.cancel_requested and updated.completed_at is None
    running, queued = queries.load_jobs(db_session, [j.id for j in rows])
    assert queued.status == JobStatus.canceled and queued.finished_at is not None
    assert running.status == JobStatus.running and running.cancel_requested
    assert chunks.claim_chunk(db_session, own[1], "w2", lease_s=60) == []
    assert jobs.cancel_requested_ids(db_session, [j.id for j in rows]) == {running.id, queued.id}
    assert not jobs.mark_canceled(db_session, running.id, "w2")
    assert jobs.mark_canceled(db_session, running.id, "w1")
    assert queries.load_jobs(db_session, [running.id])[0].status == JobStatus.canceled
    assert queries.batch_counts(db_session, batch.id)["canceled"] == 2
    [event] = deliveries(db_session, "batch.completed")
    assert event.payload["data"]["counts"]["canceled"] == 2
    assert deliveries(db_session, "job.succeeded") == []
    # Cancelling a finished job changes nothing.
    assert jobs.cancel_job(db_session, tenant_id, running.id).status == JobStatus.canceled


def test_cancel_requested_during_a_retry_ends_canceled(db_session, tenant_id):
    _, rows = jobs.submit(db_session, tenant_id, [spec()], batch=False, webhook_url=None, metadata={})
    chunks.claim_chunk(db_session, chunk_of(db_session, [rows[0].id]), "w1", lease_s=60)
    assert jobs.cancel_job(db_session, tenant_id, rows[0].id).cancel_requested
    assert jobs.retry_or_fail(db_session, rows[0].id, "w1", "transient", "blip") == "canceled"


def test_release_jobs_puts_work_back_without_spending_an_attempt(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec(), spec()])
    ids = [j.id for j in rows]
    first_chunk = chunk_of(db_session, ids)
    chunks.mark_published(db_session, [first_chunk])
    chunks.claim_chunk(db_session, first_chunk, "w1", lease_s=60)
    jobs.cancel_job(db_session, tenant_id, rows[1].id)
    assert jobs.release_jobs(db_session, ids, "w2") == 0
    assert jobs.release_jobs(db_session, ids, "w1") == 1
    released, canceled = queries.load_jobs(db_session, ids)
    assert released.status == JobStatus.queued and released.attempts == 0 and released.lease_owner is None
    assert released.chunk_id is None and released.not_before is None  # waiting, to be handed out at once
    assert canceled.status == JobStatus.canceled
    assert chunks.close_idle_chunks(db_session, utcnow()) == 1
    # A new chunk takes the released job only (a finished job is never taken again).
    second = chunk_of(db_session, ids)
    assert db_session.get(Chunk, second, populate_existing=True).job_count == 1
    [again] = chunks.claim_chunk(db_session, second, "w2", lease_s=60)
    assert again.id == released.id and again.attempts == 1


def test_progress_and_lease_renewal_need_the_lease(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec()])
    chunks.claim_chunk(db_session, chunk_of(db_session, [rows[0].id]), "w1", lease_s=5)
    before = queries.load_jobs(db_session, [rows[0].id])[0].lease_until
    jobs.record_progress(db_session, [rows[0].id], "w2", 3, 4)
    jobs.renew_lease(db_session, [rows[0].id], "w2", lease_s=600)
    job = queries.load_jobs(db_session, [rows[0].id])[0]
    assert job.progress_step == 0 and job.lease_until == before
    jobs.record_progress(db_session, [rows[0].id], "w1", 2, 4)
    jobs.renew_lease(db_session, [rows[0].id], "w1", lease_s=600)
    job = queries.load_jobs(db_session, [rows[0].id])[0]
    assert (job.progress_step, job.progress_total) == (2, 4)
    assert job.lease_until > before + timedelta(seconds=500)
    assert queries.batch_progress(db_session, job.batch_id) == 0.5


def test_due_deliveries_are_claimed_once_and_attempts_are_recorded(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec()])
    chunks.claim_chunk(db_session, chunk_of(db_session, [rows[0].id]), "w1", lease_s=60)
    jobs.complete_job(db_session, rows[0].id, "w1", output_key="o.png", model_seconds=1)
    now = utcnow()
    due = outbox.due_deliveries(db_session, now, limit=10)
    assert sorted(d.event for d in due) == ["batch.completed", "job.succeeded"]
    assert outbox.due_deliveries(db_session, now, limit=10) == []  # claimed by the first caller
    first, second = due
    outbox.record_attempt(db_session, first.id, status_code=503, error="HTTP 503", duration_ms=12.0,
                        delivered=False, next_attempt_at=now + timedelta(seconds=5))
    outbox.record_attempt(db_session, first.id, status_code=None, error="timeout", duration_ms=10_000.0,
                        delivered=False, next_attempt_at=None)
    outbox.record_attempt(db_session, first.id, status_code=200, error=None, duration_ms=1.0,
                        delivered=True, next_attempt_at=None)  # already failed: ignored
    outbox.record_attempt(db_session, second.id, status_code=204, error=None, duration_ms=3.0,
                        delivered=True, next_attempt_at=None)
    rows_by_id = {d.id: d for d in deliveries(db_session)}
    assert rows_by_id[first.id].status == DeliveryStatus.failed and rows_by_id[first.id].attempts == 2
    assert rows_by_id[first.id].last_error == "timeout"
    assert rows_by_id[second.id].status == DeliveryStatus.delivered
    assert rows_by_id[second.id].delivered_at is not None and rows_by_id[second.id].last_status_code == 204
    attempts = db_session.scalars(select(WebhookAttempt).order_by(WebhookAttempt.id)).all()
    assert [(a.delivery_id, a.attempt_no, a.status_code) for a in attempts] == [
        (first.id, 1, 503), (first.id, 2, None), (second.id, 1, 204)]


def test_reads_are_tenant_scoped(db_session, tenant_id):
    other = tenants.create_tenant(db_session, "globex").id
    batch, rows = submit_batch(db_session, tenant_id, [spec() for _ in range(5)])
    assert queries.get_job(db_session, other, rows[0].id) is None
    assert queries.get_batch(db_session, other, batch.id) is None
    assert queries.list_batch_jobs(db_session, other, batch.id) is None
    assert jobs.cancel_job(db_session, other, rows[0].id) is None
    assert jobs.cancel_batch(db_session, other, batch.id) is None
    page2 = queries.list_batch_jobs(db_session, tenant_id, batch.id, page=2, page_size=2)
    assert [j.position for j in page2] == [2, 3]
    assert queries.batch_counts(db_session, batch.id)["queued"] == 5
    assert db_session.get(Batch, batch.id).cancel_requested is False


def test_expired_results_are_listed_and_forgotten_once(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec()], webhook_url=None)
    chunks.claim_chunk(db_session, chunk_of(db_session, [rows[0].id]), "w1", lease_s=60)
    jobs.complete_job(db_session, rows[0].id, "w1", output_key="o.png", think_text="t", model_seconds=1)
    assert jobs.expired_results(db_session, utcnow(), retention_s=3600) == []
    [old] = jobs.expired_results(db_session, utcnow() + timedelta(hours=2), retention_s=3600)
    assert old.id == rows[0].id and old.output_key == "o.png"
    assert jobs.mark_result_expired(db_session, old.id)
    assert not jobs.mark_result_expired(db_session, old.id)
    job = db_session.get(Job, old.id, populate_existing=True)
    assert job.result_expired_at is not None and job.think_text is None
    assert jobs.expired_results(db_session, utcnow() + timedelta(hours=2), retention_s=3600) == []
    assert deliveries(db_session) == []


def test_an_outage_defers_without_spending_attempts_until_the_budget_is_spent(db_session, tenant_id):
    _, rows = submit_batch(db_session, tenant_id, [spec()], max_attempts=1)
    job_id = rows[0].id
    for n in (1, 2):  # one attempt allowed, yet two outages do not use it
        chunks.claim_chunk(db_session, chunk_of(db_session, [job_id]), "w1", lease_s=60)
        assert jobs.defer_job(db_session, job_id, "w1", "storage_unavailable", "down", delay_s=0.0,
                              budget_s=3600) == "queued"
        row = queries.load_jobs(db_session, [job_id])[0]
        assert (row.status, row.attempts, row.deferrals, row.chunk_id) == (JobStatus.queued, 0, n, None)
        assert row.error_code == "storage_unavailable" and row.lease_owner is None
    first_outage = row.outage_since
    assert first_outage is not None
    chunks.claim_chunk(db_session, chunk_of(db_session, [job_id]), "w1", lease_s=60)
    assert jobs.defer_job(db_session, job_id, "w2", "storage_unavailable", "down", delay_s=0.0,
                          budget_s=3600) == "running"  # not the lease holder: nothing changes
    db_session.execute(update(Job).where(Job.id == job_id).values(outage_since=first_outage - timedelta(hours=2)))
    db_session.commit()
    assert jobs.defer_job(db_session, job_id, "w1", "storage_unavailable", "down", delay_s=0.0,
                          budget_s=3600) == "failed"
    row = queries.load_jobs(db_session, [job_id])[0]
    assert (row.error_code, row.attempts) == ("dependency_outage", 1)
    assert "outage budget (3600 s)" in row.error_message
    assert [d.payload["data"]["error"]["code"] for d in deliveries(db_session, "job.failed")] == ["dependency_outage"]
