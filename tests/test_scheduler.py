"""The dispatcher's choices on real PostgreSQL and SQLite, in process: the window per live worker,
weighted fair share across tenants, priority, chunks across tenants and batches, per-tenant
running-chunk limits, deadlines, retries held back until their not_before, and the lease that
lets one dispatcher publish at a time. Publishing goes to a real (embedded SQL) broker."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tests.fixtures.contract import assert_event_matches_contract
from worker import chunks, dispatch, jobs, tenants, webhooks
from worker.db import session_factory
from worker.jobs import JobSpec
from worker.models import Chunk, Job, JobStatus, Priority, Tenant, WebhookDelivery, Worker, WorkerState, utcnow
from worker.queues import GPU_QUEUE
from worker.scheduler import Dispatcher, take_lease
from worker.settings import Settings


def spec(task: str = "generate", px: int = 64, steps: int = 4, prompt: str = "a mug") -> JobSpec:
    return JobSpec(task=task, prompt=prompt, params={"num_timesteps": steps, "seed": 1}, width=px, height=px)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=db_url, broker_url=f"sqla+sqlite:///{tmp_path}/broker.db", chunk_size=4,
                    window_per_worker=2, storage_dir=tmp_path / "storage")


@pytest.fixture
def factory(db_session: Session):
    return session_factory(db_session.get_bind())


def tenant(session: Session, name: str, **limits: object) -> str:
    row = tenants.create_tenant(session, name)
    if limits:
        session.execute(update(Tenant).where(Tenant.id == row.id).values(**limits))
        session.commit()
    return row.id


def live_workers(session: Session, n: int) -> None:
    for i in range(n):
        session.add(Worker(id=f"w{i}", state=WorkerState.ready, started_at=utcnow(), last_seen=utcnow()))
    session.commit()


def submit(session: Session, tenant_id: str, n: int, *, priority: Priority = Priority.batch, **kw: object) -> list[str]:
    _, rows = jobs.submit(session, tenant_id, [spec(**kw) for _ in range(n)], batch=n > 1, webhook_url=None,
                          metadata={}, priority=priority)
    return [j.id for j in rows]


def chunk_members(session: Session, chunk_ids: list[str]) -> list[list[tuple[str, str]]]:
    """Each chunk's jobs as (tenant, priority), in job order."""
    out = []
    for cid in chunk_ids:
        out.append([(t, str(p)) for t, p in session.execute(
            select(Job.tenant_id, Job.priority).where(Job.chunk_id == cid).order_by(Job.queued_at, Job.position))])
    session.commit()
    return out


def finish_all_chunks(session: Session) -> None:
    """Pretend the GPU ran every dispatched job: succeeded, chunks finished."""
    now = utcnow()
    session.execute(update(Job).where(Job.chunk_id.is_not(None), Job.status == JobStatus.queued)
                    .values(status=JobStatus.succeeded, finished_at=now, gpu_seconds=10.0))
    session.execute(update(Chunk).where(Chunk.finished_at.is_(None)).values(finished_at=now))
    session.commit()


def test_the_window_is_two_chunks_per_live_worker(db_session, settings, factory):
    a = tenant(db_session, "a")
    submit(db_session, a, 40)
    dispatcher = Dispatcher(settings, factory, "d1")
    assert dispatcher.dispatch_once().formed == 0  # no live worker: nothing leaves the database
    live_workers(db_session, 1)
    report = dispatcher.dispatch_once()
    assert (report.formed, report.published, report.chunk_jobs) == (2, 2, [4, 4])
    assert dispatcher.dispatch_once().formed == 0  # the window is full until a chunk finishes
    assert dispatch.queue_length(settings, GPU_QUEUE) == 2
    finish_all_chunks(db_session)
    assert dispatcher.dispatch_once().formed == 2


def test_fair_share_interleaves_a_small_tenant_ahead_of_a_big_backlog(db_session, settings, factory):
    big, small = tenant(db_session, "big"), tenant(db_session, "small")
    submit(db_session, big, 40)
    live_workers(db_session, 2)
    dispatcher = Dispatcher(settings, factory, "d1")
    assert dispatcher.dispatch_once().formed == 4  # all big's: nobody else waits
    submit(db_session, small, 8, px=32)  # another output size: chunks of its own
    finish_all_chunks(db_session)
    formed = chunk_members(db_session, dispatcher.dispatch_once().chunk_ids)
    # big has 16 jobs' worth of recent use, small none: small's two chunks go first
    assert [c[0][0] for c in formed] == [small, small, big, big]


def test_weights_scale_the_share(db_session, settings, factory):
    heavy, light = tenant(db_session, "heavy", weight=10.0), tenant(db_session, "light")
    live_workers(db_session, 1)
    now = utcnow()
    for tid, used in ((heavy, 100.0), (light, 30.0)):  # recent use: heavy 100/10 = 10, light 30/1
        [job_id] = submit(db_session, tid, 1, px=16)
        db_session.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.succeeded, gpu_seconds=used, finished_at=now))
    db_session.commit()
    submit(db_session, light, 4)
    submit(db_session, heavy, 4, px=32)
    report = Dispatcher(settings, factory, "d1").dispatch_once()
    assert [c[0][0] for c in chunk_members(db_session, report.chunk_ids)] == [heavy, light]


def test_interactive_jobs_of_a_tenant_go_before_its_batch_work(db_session, settings, factory):
    a = tenant(db_session, "a")
    submit(db_session, a, 12)
    submit(db_session, a, 2, priority=Priority.interactive)
    live_workers(db_session, 1)
    first = chunk_members(db_session, Dispatcher(settings, factory, "d1").dispatch_once().chunk_ids)[0]
    assert sorted(p for _, p in first) == ["batch", "batch", "interactive", "interactive"]


def test_compatible_jobs_of_different_tenants_and_batches_share_a_chunk(db_session, settings, factory):
    a, b = tenant(db_session, "a"), tenant(db_session, "b")
    submit(db_session, a, 2)
    submit(db_session, b, 1)
    submit(db_session, a, 1)  # another batch of a's, a single job
    submit(db_session, b, 2, steps=8)  # other steps: not compatible
    live_workers(db_session, 1)
    first, second = chunk_members(db_session, Dispatcher(settings, factory, "d1").dispatch_once().chunk_ids)
    assert sorted(t for t, _ in first) == sorted([a, a, a, b]) and [t for t, _ in second] == [b, b]


def test_a_tenants_running_chunk_limit_holds(db_session, settings, factory):
    a, b = tenant(db_session, "a", max_running_chunks=1), tenant(db_session, "b")
    submit(db_session, a, 20)
    submit(db_session, b, 20, px=32)
    live_workers(db_session, 2)
    owners = [c[0][0] for c in chunk_members(db_session, Dispatcher(settings, factory, "d1").dispatch_once().chunk_ids)]
    assert owners.count(a) == 1 and owners.count(b) == 3


def test_a_retry_waits_for_its_not_before(db_session, settings, factory):
    a = tenant(db_session, "a")
    [job_id] = submit(db_session, a, 1)
    live_workers(db_session, 1)
    dispatcher = Dispatcher(settings, factory, "d1")
    dispatcher.dispatch_once()
    [chunk_id] = db_session.scalars(select(Chunk.id)).all()
    chunks.claim_chunk(db_session, chunk_id, "w0", lease_s=60)
    assert jobs.retry_or_fail(db_session, job_id, "w0", "storage_unavailable", "down", delay_s=3600) == "queued"
    chunks.finish_chunk(db_session, chunk_id, 0.5)
    job = db_session.get(Job, job_id, populate_existing=True)
    assert job.chunk_id is None and job.not_before > utcnow()
    db_session.commit()  # SQLite: every transaction takes the write lock
    report = dispatcher.dispatch_once()
    assert report.formed == 0  # held back: not before an hour from now
    db_session.execute(update(Job).where(Job.id == job_id).values(not_before=utcnow() - timedelta(seconds=1)))
    db_session.commit()
    assert dispatcher.dispatch_once().formed == 1


def test_a_waiting_job_past_its_deadline_expires_without_a_gpu(db_session, settings, factory):
    a = tenant(db_session, "a")
    _, rows = jobs.submit(db_session, a, [spec()], batch=False, webhook_url="http://127.0.0.1:9/hook", metadata={},
                          deadline_at=utcnow() - timedelta(seconds=1))
    live_workers(db_session, 1)
    report = Dispatcher(settings, factory, "d1").dispatch_once()
    assert (report.expired, report.formed) == (1, 0)
    job = db_session.get(Job, rows[0].id, populate_existing=True)
    assert job.status == JobStatus.expired and job.error_code == "deadline_expired" and job.gpu_seconds is None
    events = db_session.scalars(select(WebhookDelivery)).all()
    assert [e.event for e in events] == ["job.expired"]
    assert_event_matches_contract(json.loads(webhooks.envelope(events[0].event, events[0].created_at,
                                                               events[0].payload, lambda key: f"https://x/{key}")))


def test_one_dispatcher_holds_the_lease(db_session, settings, factory):
    a = tenant(db_session, "a")
    submit(db_session, a, 40)
    live_workers(db_session, 4)
    first, second = Dispatcher(settings, factory, "d1"), Dispatcher(settings, factory, "d2")
    assert first.dispatch_once().leader and not second.dispatch_once().leader
    assert db_session.scalar(select(func.sum(Chunk.publish_count))) == 8  # only d1 published
    db_session.commit()
    with factory() as s:  # d1 stops answering: d2 takes over once the lease has expired
        assert not take_lease(s, "d2", 5.0)
        assert take_lease(s, "d2", 5.0, now=utcnow() + timedelta(seconds=settings.dispatch_lease_s + 1))
    assert not first.dispatch_once().leader


def test_a_dispatcher_that_stalled_past_its_lease_publishes_nothing(db_session, settings, factory, monkeypatch):
    a = tenant(db_session, "a")
    submit(db_session, a, 8)
    live_workers(db_session, 1)
    first, second = Dispatcher(settings, factory, "d1"), Dispatcher(settings, factory, "d2")
    stalled = first._publish

    def stall_then_publish(chunk_ids: list[str]) -> int:
        # d1 formed its chunks, then stopped answering for longer than its lease: d2 took over
        # and published them; d1 wakes up and would publish the same chunks a second time.
        with factory() as s:
            assert take_lease(s, "d2", 5.0, now=utcnow() + timedelta(seconds=settings.dispatch_lease_s + 1))
        assert second.dispatch_once().published == 2
        return stalled(chunk_ids)

    monkeypatch.setattr(first, "_publish", stall_then_publish)
    report = first.dispatch_once()
    assert report.leader and report.formed == 2 and report.published == 0
    counts = db_session.scalars(select(Chunk.publish_count)).all()
    assert sorted(counts) == [1, 1]  # each chunk sent once, by d2
    assert dispatch.queue_length(settings, GPU_QUEUE) == 2


def test_chunks_the_broker_refused_stay_unpublished_until_it_is_back(db_session, settings, factory):
    a = tenant(db_session, "a")
    submit(db_session, a, 8)
    live_workers(db_session, 1)
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})  # nothing listens on port 9
    report = Dispatcher(down, factory, "d1").dispatch_once()
    assert report.formed == 2 and report.published == 0
    rows = db_session.execute(select(Chunk.published_at, Chunk.publish_count)).all()
    assert rows == [(None, 0), (None, 0)]  # not counted as sent, so not taken for lost messages
    db_session.commit()
    report = Dispatcher(settings, factory, "d1").dispatch_once()
    assert report.formed == 0 and report.published == 2
    assert sorted(db_session.scalars(select(Chunk.publish_count)).all()) == [1, 1]
    assert dispatch.queue_length(settings, GPU_QUEUE) == 2


def waiting_turns(session: Session) -> list[str]:
    """Published chunks no worker has claimed, in the order workers will take them."""
    ids = session.scalars(select(Chunk.id).where(Chunk.published_at.is_not(None), Chunk.claimed_at.is_(None),
                                                 Chunk.finished_at.is_(None))
                          .order_by(Chunk.priority_rank, Chunk.share, Chunk.created_at)).all()
    session.commit()
    return list(ids)


def full_window_of(session: Session, settings: Settings, factory, big: str) -> Dispatcher:
    """One live worker, big has recent use and its two chunks wait in the broker (window full)."""
    live_workers(session, 1)
    dispatcher = Dispatcher(settings, factory, "d1")
    submit(session, big, 8)
    assert dispatcher.dispatch_once().formed == 2
    finish_all_chunks(session)  # 80 GPU-seconds of recent use
    submit(session, big, 16)
    assert dispatcher.dispatch_once().formed == 2
    return dispatcher


@pytest.mark.parametrize("who", ["small-tenant", "interactive"])
def test_a_better_chunk_takes_the_turn_of_a_waiting_one_when_the_window_is_full(db_session, settings, factory,
                                                                                  who):
    big = tenant(db_session, "big")
    dispatcher = full_window_of(db_session, settings, factory, big)
    before = waiting_turns(db_session)
    messages = dispatch.queue_length(settings, GPU_QUEUE)
    if who == "interactive":
        newcomer = submit(db_session, big, 4, priority=Priority.interactive)
    else:
        newcomer = submit(db_session, tenant(db_session, "small"), 4)
    report = dispatcher.dispatch_once()
    assert report.formed == 0 and report.published == 0 and report.preempted == 1
    after = waiting_turns(db_session)
    # the newcomer's chunk comes first; the worst waiting chunk (formed last) gave its place up
    assert after[1:] == before[:1] and before[1] not in after
    dissolved = db_session.get(Chunk, before[1], populate_existing=True)
    assert dissolved.finished_at is not None and dissolved.claimed_at is None
    assert db_session.scalar(select(func.count()).select_from(Job).where(Job.chunk_id == before[1],
                                                                         Job.status == JobStatus.queued)) == 0
    back = db_session.scalars(select(Job).where(Job.status == JobStatus.queued, Job.chunk_id.is_(None))).all()
    assert len(back) == 12 and all(j.attempts == 0 for j in back)  # 8 never dispatched, 4 given back
    # no message sent: the dissolved chunk's serves the new one
    assert dispatch.queue_length(settings, GPU_QUEUE) == messages and len(after) == 2
    assert db_session.get(Chunk, after[0], populate_existing=True).publish_count == 1
    db_session.commit()
    claimed_id, claimed = chunks.claim_next(db_session, "w0", lease_s=60)
    assert claimed_id == after[0] and sorted(j.id for j in claimed) == sorted(newcomer)
    # nothing changes hands back: big's waiting jobs do not beat the newcomer's chunk, nor the next pass
    assert dispatcher.dispatch_once().preempted == 0


def test_chunks_of_about_equal_share_do_not_take_each_others_turns(db_session, settings, factory):
    big, other = tenant(db_session, "big"), tenant(db_session, "other")
    dispatcher = full_window_of(db_session, settings, factory, big)
    now = utcnow()
    [job_id] = submit(db_session, other, 1, px=16)  # other's recent use: just above big's last chunk's share
    db_session.execute(update(Job).where(Job.id == job_id).values(
        status=JobStatus.succeeded, gpu_seconds=120.0 - 5.0, finished_at=now))
    db_session.commit()
    submit(db_session, other, 4)
    assert dispatcher.dispatch_once().preempted == 0  # 115 is not a whole job (10 s) below 120


def test_a_claimed_chunk_cannot_be_dissolved_nor_a_dissolved_one_claimed(db_session, settings, factory):
    big = tenant(db_session, "big")
    full_window_of(db_session, settings, factory, big)
    first, second = waiting_turns(db_session)
    assert chunks.claim_chunk(db_session, first, "w0", lease_s=60)
    assert chunks.dissolve_chunk(db_session, first, utcnow()) == 0
    assert chunks.dissolve_chunk(db_session, second, utcnow()) == 4
    db_session.commit()
    assert chunks.claim_chunk(db_session, second, "w0", lease_s=60) == []
