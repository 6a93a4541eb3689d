"""A chunk's life: formed by the dispatcher, published, claimed by a worker, finished — or
dissolved before any worker claimed it, its jobs waiting again.

Owns: the writes to ``chunks`` and the jobs' ``chunk_id`` (``form_chunk``, ``dissolve_chunk``),
the publication bookkeeping (``mark_published``/``unmark_published``), the claim (a message is a
turn: ``claim_next``) and the end of a chunk (``finish_chunk``, ``close_idle_chunks``). Leaves
the choice of chunks to ``scheduler.py``, sending messages to ``dispatch.py`` and every job
transition after the claim to ``jobs.py``. Like there, each change is one conditional UPDATE,
so a claim and a dissolution racing for one chunk cannot both win.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, case, func, select, update
from sqlalchemy.orm import Session

from worker import queries
from worker.models import ACTIVE_STATUSES, Chunk, Job, JobStatus, utcnow

log = logging.getLogger(__name__)

_NO_SYNC = {"synchronize_session": False}


def form_chunk(session: Session, job_ids: Sequence[str], now: datetime, *, share: float = 0.0,
               priority_rank: int = 1, preferred_worker: str | None = None) -> str | None:
    """The dispatcher's chunk: a new chunk row taking the given waiting jobs (those still
    waiting and without a chunk; others are left alone), ranked by ``priority_rank`` then
    ``share`` (``claim_next``). None when none was taken. No commit."""
    chunk = Chunk(id=str(uuid.uuid4()), created_at=now, publish_count=0, job_count=0, cost_key="", share=share,
                  priority_rank=priority_rank, preferred_worker=preferred_worker)
    session.add(chunk)
    session.flush()
    taken = session.execute(
        update(Job).where(Job.id.in_(list(job_ids)), Job.status == JobStatus.queued, Job.chunk_id.is_(None),
                          Job.dedupe_of.is_(None), Job.after_job_id.is_(None))
        .values(chunk_id=chunk.id, updated_at=now).returning(Job.cost_key).execution_options(**_NO_SYNC)
    ).scalars().all()
    if not taken:
        session.delete(chunk)
        return None
    chunk.job_count = len(taken)
    chunk.cost_key = taken[0]
    return chunk.id


def claim_chunk(session: Session, chunk_id: str, worker_id: str, lease_s: float) -> list[Job]:
    """Take the chunk's queued, not-cancel-requested jobs: ``running``, attempts + 1, leased to
    ``worker_id`` for ``lease_s``; the chunk records its claim (a chunk with nothing left to
    claim is finished). Returns only the jobs this call claimed (by position)."""
    now = utcnow()
    taken = session.execute(update(Chunk).where(Chunk.id == chunk_id, Chunk.claimed_at.is_(None),
                                                Chunk.finished_at.is_(None))
                            .values(claimed_at=now, claimed_by=worker_id).execution_options(**_NO_SYNC)).rowcount
    if not taken:  # another worker's turn took it first (or a repeated message)
        session.commit()
        return []
    claimed = session.execute(
        update(Job)
        .where(Job.chunk_id == chunk_id, Job.status == JobStatus.queued, Job.cancel_requested.is_(False))
        .values(status=JobStatus.running, attempts=Job.attempts + 1, lease_owner=worker_id,
                lease_until=now + timedelta(seconds=lease_s), started_at=now, updated_at=now,
                progress_step=0)
        .returning(Job.id)
        .execution_options(**_NO_SYNC)
    ).scalars().all()
    if not claimed:  # nothing left in it (canceled, expired): done
        session.execute(update(Chunk).where(Chunk.id == chunk_id, Chunk.finished_at.is_(None))
                        .values(finished_at=now).execution_options(**_NO_SYNC))
    session.commit()
    if not claimed:
        return []
    jobs = queries.load_jobs(session, claimed)
    log.info("worker %s claimed %d job(s) of chunk %s", worker_id, len(jobs), chunk_id)
    return jobs


def claim_next(session: Session, worker_id: str, lease_s: float, *, affinity_s: float = 0.0,
               tries: int = 8) -> tuple[str | None, list[Job]]:
    """A ``run_chunk`` message is a turn, not a particular chunk: take the published, unclaimed
    chunk that comes first — interactive before batch, then the lowest ``share`` (its tenant's
    fair-share key when formed), then age — and claim its jobs (``claim_chunk``). Formation
    already follows fair share (``scheduler.py``); this order only lets a chunk formed for a
    tenant with a smaller share, or for interactive work, overtake the few chunks waiting in the
    broker. A chunk preferred for this worker (a session's turn whose context it holds) comes
    first; one preferred for another worker is left to it for ``affinity_s`` after it was formed.
    Returns the chunk id (None: nothing to run) and the jobs claimed."""
    for _ in range(tries):
        left_to_others = and_(Chunk.preferred_worker.is_not(None), Chunk.preferred_worker != worker_id,
                              Chunk.created_at > utcnow() - timedelta(seconds=affinity_s))
        candidate = session.scalar(
            select(Chunk.id).where(Chunk.claimed_at.is_(None), Chunk.finished_at.is_(None),
                                   Chunk.published_at.is_not(None), ~left_to_others)
            .order_by(case((Chunk.preferred_worker == worker_id, 0), else_=1), Chunk.priority_rank, Chunk.share,
                      Chunk.created_at).limit(1))
        session.commit()
        if candidate is None:
            return None, []
        claimed = claim_chunk(session, candidate, worker_id, lease_s)
        if claimed:
            return candidate, claimed
    return None, []


def finish_chunk(session: Session, chunk_id: str, gpu_seconds: float) -> None:
    """The worker is done with the chunk: record its GPU time and free its window slot (the
    dispatcher may have closed it already, once its last job was recorded)."""
    session.execute(update(Chunk).where(Chunk.id == chunk_id)
                    .values(finished_at=func.coalesce(Chunk.finished_at, utcnow()), gpu_seconds=gpu_seconds)
                    .execution_options(**_NO_SYNC))
    session.commit()


def close_idle_chunks(session: Session, now: datetime) -> int:
    """Unfinished chunks none of whose jobs is still queued or running in them (finished,
    canceled, expired or returned to waiting by a retry, a release or an expired lease) →
    finished, freeing their window slots. Returns how many."""
    active = select(Job.id).where(Job.chunk_id == Chunk.id, Job.status.in_(list(ACTIVE_STATUSES))).exists()
    closed = session.execute(update(Chunk).where(Chunk.finished_at.is_(None), ~active)
                             .values(finished_at=now).execution_options(**_NO_SYNC)).rowcount
    session.commit()
    return int(closed or 0)


def mark_published(session: Session, chunk_ids: Iterable[str], *, commit: bool = True) -> list[str]:
    """Record that a message is about to be sent for each chunk still waiting for a worker
    (unclaimed, unfinished); returns those ids — the ones to send. The caller sends them after
    the commit and gives back the ones the broker refused (``unmark_published``); a crash in
    between leaves a published chunk without a message, which the dispatcher finds lost."""
    ids = list(chunk_ids)
    if not ids:
        return []
    marked = session.scalars(
        update(Chunk).where(Chunk.id.in_(ids), Chunk.claimed_at.is_(None), Chunk.finished_at.is_(None))
        .values(published_at=utcnow(), publish_count=Chunk.publish_count + 1)
        .returning(Chunk.id).execution_options(**_NO_SYNC)).all()
    if commit:
        session.commit()
    sent = set(marked)
    return [cid for cid in ids if cid in sent]


def unmark_published(session: Session, chunk_ids: Iterable[str]) -> None:
    """The broker refused the messages ``mark_published`` recorded: count them unsent, and a
    chunk never sent before is unpublished again (sent on a later pass)."""
    ids = list(chunk_ids)
    if not ids:
        return
    session.execute(update(Chunk).where(Chunk.id.in_(ids), Chunk.publish_count > 0)
                    .values(publish_count=Chunk.publish_count - 1,
                            published_at=case((Chunk.publish_count == 1, None), else_=Chunk.published_at))
                    .execution_options(**_NO_SYNC))
    session.commit()


def dissolve_chunk(session: Session, chunk_id: str, now: datetime) -> int:
    """Give up a published chunk no worker has claimed — a better one takes its turn
    (``scheduler.py``): the chunk is finished and its jobs wait again, unchanged (no attempt
    spent). Returns how many jobs it gave back; 0 when a worker claimed it first. No commit."""
    taken = session.execute(update(Chunk).where(Chunk.id == chunk_id, Chunk.claimed_at.is_(None),
                                                Chunk.finished_at.is_(None))
                            .values(finished_at=now).execution_options(**_NO_SYNC)).rowcount
    if not taken:
        return 0
    return int(session.execute(update(Job).where(Job.chunk_id == chunk_id, Job.status == JobStatus.queued)
                               .values(chunk_id=None, updated_at=now).execution_options(**_NO_SYNC)).rowcount or 0)
