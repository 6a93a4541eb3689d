"""The dispatcher: the database schedules, the broker only carries a small window.

Owns: the dispatcher's passes and the choice each makes. Jobs wait in the database
(``queued``, no chunk); a job waiting on an identical one (``dedupe_of``, ``worker.dedupe``) or
a session's turn waiting on the turn before it (``after_job_id``) is never formed into a chunk.
A pass (``Dispatcher.dispatch_once``) is run by one process at a time cluster-wide — the
holder of the ``leases`` row named ``dispatcher``, taken when free or expired and renewed by its
holder; the same code on PostgreSQL and SQLite — and

1. ends waiting jobs whose deadline passed (``expired``, no GPU used) and closes chunks left
   with no active job (finished, canceled, returned);
2. finds published chunks whose message is provably lost — more unclaimed chunks than messages
   in the broker's ``gpu`` queue for longer than ``lost_message_after_s`` — and publishes the
   oldest of them again (Redis flushed or restarted: at most the window is lost);
3. fills the window: ``window_per_worker`` chunks per live GPU worker (about one running and
   one waiting each) minus the chunks already out, each formed from compatible waiting jobs
   (equal ``chunk_key``: task, output size, steps, think, input pictures) of any batch and any
   tenant, up to ``chunk_size``;
4. with the window full, lets a chunk that would now be formed ahead of a waiting (published,
   unclaimed) one take its place (``Dispatcher._preempt``): the waiting chunk is dissolved, its
   jobs wait again, and the broker's message serves the new chunk — a small tenant's or an
   interactive submission waits for the next free worker, not for a free slot first;
5. records the new chunks published — in the transaction that renews its lease, so a holder
   that stalled past its lease publishes nothing — then sends their messages (ids only); a
   broker outage gives them back unpublished, for a later pass.

The choice (step 3): the next chunk goes to the tenant with the least recent GPU use per unit
of weight — GPU-seconds of its jobs finished within ``fair_share_window_s`` plus the estimated
GPU-seconds of its running and already dispatched work, divided by ``Tenant.weight`` — among
tenants with a job ready and below ``max_running_chunks``; its first job by priority
(``interactive`` before ``batch``) then age heads the chunk, and the chunk is filled with
compatible jobs, the head tenant's first, then the other tenants' in fair-share order. Every
job taken adds its estimated cost (``job_costs``, else ``DEFAULT_JOB_GPU_SECONDS``) to its
tenant's use, so one pass spreads over tenants the way the GPU time will. The chunk keeps its
head's priority and share (``Chunk.priority_rank``, ``share``): a message is a turn, and the
worker taking it claims the first published chunk by priority then share (``chunks.claim_next``),
so a chunk formed for a small tenant, or for interactive work, overtakes the chunks already
waiting in the broker.

Leaves publishing to ``dispatch.py``, the claim and every job transition to ``jobs.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from worker import chunks, dispatch, jobs
from worker.errors import BrokerUnavailable
from worker.jobs import DEFAULT_JOB_GPU_SECONDS
from worker.models import Chunk, Job, JobCost, JobStatus, Lease, Priority, Tenant, Worker, WorkerState, utcnow
from worker.queues import GPU_QUEUE, worker_queue

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings

log = logging.getLogger(__name__)

LEASE_NAME = "dispatcher"
MAX_CANDIDATES = 50_000  # waiting jobs one pass looks at (oldest first per priority)
PRIORITY_RANK = {Priority.interactive.value: 0, Priority.batch.value: 1}


@dataclass
class DispatchReport:
    """What one pass did (logged, and asserted on by tests)."""

    leader: bool = False
    live_workers: int = 0
    outstanding: int = 0
    formed: int = 0
    published: int = 0
    republished: int = 0
    preempted: int = 0
    expired: int = 0
    closed: int = 0
    chunk_ids: list[str] = field(default_factory=list)  # formed, in the order they were chosen
    chunk_jobs: list[int] = field(default_factory=list)


@dataclass
class _Plan:
    """A chunk the dispatcher would form: its jobs, and its head's share and priority rank."""

    job_ids: list[str]
    share: float
    rank: int
    session_id: str | None = None  # a session's turn (alone in its chunk: its chunk key is its own)


@dataclass
class _Turn:
    """A published chunk no worker has claimed yet (its message waits in the broker)."""

    id: str
    rank: int
    share: float
    job_cost: float  # estimated GPU-seconds of one of its jobs


@dataclass
class _Waiting:
    id: str
    tenant_id: str
    priority: str
    chunk_key: str
    cost: float
    session_id: str | None = None


def take_lease(session: Session, owner: str, lease_s: float, now: datetime | None = None) -> bool:
    """Hold the dispatcher lease for ``lease_s`` from now: taken when free or expired, renewed
    when ``owner`` holds it. Returns whether ``owner`` holds it afterwards."""
    now = now or utcnow()
    until = now + timedelta(seconds=lease_s)
    taken = session.execute(
        update(Lease).where(Lease.name == LEASE_NAME, or_(Lease.owner == owner, Lease.until < now))
        .values(owner=owner, until=until).execution_options(synchronize_session=False)
    ).rowcount
    if not taken:
        exists = session.scalar(select(Lease.name).where(Lease.name == LEASE_NAME))
        if exists is None:
            try:
                session.execute(insert(Lease).values(name=LEASE_NAME, owner=owner, until=until))
                taken = 1
            except IntegrityError:  # another dispatcher inserted it first
                session.rollback()
                return False
    session.commit()
    return bool(taken)


def renew_lease(session: Session, owner: str, lease_s: float) -> bool:
    """Extend ``owner``'s unexpired lease, without committing: the caller commits it with the
    writes it fences. Returns False (nothing changed) when ``owner`` no longer holds it."""
    now = utcnow()
    return bool(session.execute(
        update(Lease).where(Lease.name == LEASE_NAME, Lease.owner == owner, Lease.until >= now)
        .values(until=now + timedelta(seconds=lease_s)).execution_options(synchronize_session=False)
    ).rowcount)


def release_lease(session: Session, owner: str) -> None:
    """Give the lease up (a clean stop), so another dispatcher need not wait for it to expire."""
    session.execute(update(Lease).where(Lease.name == LEASE_NAME, Lease.owner == owner)
                    .values(until=utcnow() - timedelta(seconds=1)).execution_options(synchronize_session=False))
    session.commit()


def live_workers(session: Session, settings: Settings, now: datetime) -> int:
    """GPU workers that are ready and were heard from within ``worker_dead_after_s``."""
    since = now - timedelta(seconds=settings.worker_dead_after_s)
    return int(session.scalar(select(func.count()).select_from(Worker).where(
        Worker.state == WorkerState.ready, Worker.last_seen >= since)) or 0)


def job_costs(session: Session) -> dict[str, float]:
    """Measured GPU-seconds per job kind (``cost_key``)."""
    return {key: float(avg) for key, avg in session.execute(select(JobCost.cost_key, JobCost.avg_gpu_seconds))}


class Dispatcher:
    """One dispatcher process's passes: its lease owner id and what it remembers between
    passes (how long each suspect message has been missing from the broker)."""

    def __init__(self, settings: Settings, session: Callable[[], Session], owner: str) -> None:
        self.settings = settings
        self.session = session
        self.owner = owner
        # Chunk ids seen unclaimed while the broker held fewer messages, with the first time
        # seen: a message is lost only when the shortfall lasts ``lost_message_after_s`` (a
        # worker between taking a message and claiming its chunk is a shortfall of an instant).
        self.shortfall_since: dict[str, datetime] = {}
        # What the waiting jobs and the waiting turns were at the last look for a preemption:
        # unchanged, no chunk can be formed that would beat a waiting one any better than then.
        self.preempt_seen: tuple[object, ...] | None = None

    def dispatch_once(self) -> DispatchReport:
        """One pass (see the module docstring). Only the lease holder dispatches."""
        settings, session = self.settings, self.session
        report = DispatchReport()
        with session() as s:
            if not take_lease(s, self.owner, settings.dispatch_lease_s):
                return report
        report.leader = True
        now = utcnow()
        with session() as s:
            report.expired = jobs.expire_waiting(s, now)
            report.closed = chunks.close_idle_chunks(s, now)
            report.live_workers = live_workers(s, settings, now)
            unpublished, unclaimed = _outstanding(s)
            report.outstanding = int(s.scalar(select(func.count()).select_from(Chunk)
                                              .where(Chunk.finished_at.is_(None))) or 0)
        to_publish = list(unpublished)
        lost = self._lost_messages(unclaimed, now)
        to_publish += lost
        report.republished = len(lost)
        slots = report.live_workers * settings.window_per_worker - report.outstanding
        if slots > 0:
            with session() as s:
                formed = _form_chunks(s, settings, slots, now)
            report.formed = len(formed)
            report.chunk_ids = [cid for cid, _ in formed]
            report.chunk_jobs = [n for _, n in formed]
            to_publish += [cid for cid, _ in formed]
        else:
            report.preempted = self._preempt(now)
        if to_publish:
            report.published = self._publish(to_publish)
        return report

    def _publish(self, chunk_ids: list[str]) -> int:
        """Record the chunks published, fenced by the lease, then send their messages: the lease
        is renewed in the same transaction that marks them, so a dispatcher that stalled past its
        lease (another took over and may publish the same chunks) marks and sends nothing."""
        with self.session() as s:
            if not renew_lease(s, self.owner, self.settings.dispatch_lease_s):
                s.rollback()
                log.warning("dispatcher %s: lease lost during the pass; publishing nothing", self.owner)
                return 0
            marked = chunks.mark_published(s, chunk_ids)  # commits the renewal with the marks
        if not marked:
            return 0
        try:
            with self.session() as s:  # a session's turn goes to the worker holding its context first
                preferred = dict(s.execute(select(Chunk.id, Chunk.preferred_worker).where(
                    Chunk.id.in_(marked), Chunk.preferred_worker.is_not(None), Chunk.publish_count == 1)).all())
            dispatch.publish_chunks(self.settings, [cid for cid in marked if cid not in preferred])
            for cid, worker_id in preferred.items():
                dispatch.publish_chunks(self.settings, [cid], queue=worker_queue(worker_id))
        except BrokerUnavailable as exc:
            log.warning("dispatcher: %s; %d chunk(s) stay formed for the next pass", exc, len(marked))
            with self.session() as s:
                chunks.unmark_published(s, marked)
            return 0
        return len(marked)

    def _preempt(self, now: datetime) -> int:
        """With the window full, a chunk that would now be formed ahead of a waiting turn — a
        better priority, or a share smaller by more than one of its jobs' cost (so that two
        tenants of about equal use do not take each other's place back and forth) — takes it: the
        waiting chunk is dissolved (its jobs wait again, no attempt spent) and the new one is
        recorded published in its place, its message being the one already in the broker. A
        small tenant's or an interactive submission so waits for the next free worker, never
        for a slot first. Fenced by the lease like ``_publish``. Returns how many were replaced."""
        settings = self.settings
        with self.session() as s:
            costs = job_costs(s)
            turns = _waiting_turns(s, costs)
            seen = (_waiting_signature(s, now), tuple(turn.id for turn in turns))
            if not turns or seen == self.preempt_seen:
                s.commit()
                return 0
            self.preempt_seen = seen
            pairs = []
            for plan, turn in zip(_plan_chunks(s, settings, len(turns), now), turns):
                if (plan.rank, plan.share + turn.job_cost) >= (turn.rank, turn.share):
                    break  # plans come best first, turns worst first: no later pair is better
                pairs.append((plan, turn))
            if not pairs or not renew_lease(s, self.owner, settings.dispatch_lease_s):
                s.rollback()
                return 0
            replaced = []
            for plan, turn in pairs:
                if not chunks.dissolve_chunk(s, turn.id, now):
                    continue  # a worker claimed it meanwhile
                chunk_id = chunks.form_chunk(s, plan.job_ids, now, share=plan.share, priority_rank=plan.rank)
                if chunk_id is not None:
                    replaced.append(chunk_id)
            chunks.mark_published(s, replaced, commit=False)
            s.commit()
        if replaced:
            log.info("dispatcher: %d better chunk(s) took the turn of waiting ones", len(replaced))
        return len(replaced)

    def _lost_messages(self, unclaimed: list[tuple[str, datetime]], now: datetime) -> list[str]:
        """Published, unclaimed chunks whose messages the broker no longer holds (see above)."""
        if not unclaimed:
            self.shortfall_since.clear()
            return []
        try:
            waiting = dispatch.queue_length(self.settings, GPU_QUEUE)
        except BrokerUnavailable as exc:
            log.warning("dispatcher: cannot count broker messages: %s", exc)
            return []
        missing = len(unclaimed) - waiting
        if missing <= 0:
            self.shortfall_since.clear()
            return []
        # FIFO broker: the messages still there are the newest; the oldest ones are missing
        suspects = [cid for cid, _ in sorted(unclaimed, key=lambda c: c[1])[:missing]]
        for cid in list(self.shortfall_since):
            if cid not in suspects:
                del self.shortfall_since[cid]
        lost = []
        for cid in suspects:
            first = self.shortfall_since.setdefault(cid, now)
            if (now - first).total_seconds() >= self.settings.lost_message_after_s:
                lost.append(cid)
                del self.shortfall_since[cid]
        if lost:
            log.warning("dispatcher: %d chunk message(s) lost from the broker (%d unclaimed, %d in the queue); "
                        "publishing them again", len(lost), len(unclaimed), waiting)
        return lost

    def run_forever(self, stop: threading.Event) -> None:
        """Dispatch every ``dispatch_interval_s`` until ``stop`` is set; gives the lease up at the end."""
        log.info("dispatcher %s started: every %.2f s, %d chunk(s) per live worker", self.owner,
                 self.settings.dispatch_interval_s, self.settings.window_per_worker)
        leading = False
        while not stop.is_set():
            try:
                report = self.dispatch_once()
                if report.leader != leading:
                    leading = report.leader
                    log.info("dispatcher %s %s the lease", self.owner, "holds" if leading else "lost")
                if report.formed or report.republished or report.expired or report.preempted:
                    log.info("dispatcher pass: %s", report)
            except Exception:  # noqa: BLE001 - the loop must survive a database or broker outage
                log.exception("dispatcher pass failed")
            stop.wait(self.settings.dispatch_interval_s)
        try:
            with self.session() as s:
                release_lease(s, self.owner)
        except Exception:  # noqa: BLE001
            log.warning("dispatcher %s: could not release the lease; it expires by itself", self.owner)
        log.info("dispatcher %s stopped", self.owner)


def _outstanding(s: Session) -> tuple[list[str], list[tuple[str, datetime]]]:
    """Unfinished chunks never published (oldest first), and published ones not yet claimed."""
    rows = s.execute(select(Chunk.id, Chunk.published_at).where(
        Chunk.finished_at.is_(None), Chunk.claimed_at.is_(None)).order_by(Chunk.created_at)).all()
    s.commit()
    return [cid for cid, at in rows if at is None], [(cid, at) for cid, at in rows if at is not None]


def _waiting_turns(s: Session, costs: dict[str, float]) -> list[_Turn]:
    """Published chunks no worker has claimed, worst first (the reverse of ``claim_next``'s order)."""
    rows = s.execute(select(Chunk.id, Chunk.priority_rank, Chunk.share, Chunk.cost_key)
                     .where(Chunk.published_at.is_not(None), Chunk.claimed_at.is_(None),
                            Chunk.finished_at.is_(None))
                     .order_by(Chunk.priority_rank.desc(), Chunk.share.desc(), Chunk.created_at.desc())).all()
    return [_Turn(cid, int(rank), float(share or 0.0), costs.get(key, DEFAULT_JOB_GPU_SECONDS))
            for cid, rank, share, key in rows]


def _waiting_signature(s: Session, now: datetime) -> tuple[object, ...]:
    """How many jobs are ready to be formed into chunks, and the newest of them."""
    count, newest = s.execute(select(func.count(), func.max(Job.queued_at)).where(
        Job.status == JobStatus.queued, Job.chunk_id.is_(None), Job.cancel_requested.is_(False),
        Job.dedupe_of.is_(None), Job.after_job_id.is_(None),
        or_(Job.not_before.is_(None), Job.not_before <= now))).one()
    return int(count or 0), newest


def _tenant_use(s: Session, settings: Settings, costs: dict[str, float], now: datetime
                ) -> tuple[dict[str, float], dict[str, int]]:
    """Per tenant: recent GPU-seconds (finished within the window, plus the estimate of work
    running or dispatched), and the number of unfinished chunks holding its jobs."""
    since = now - timedelta(seconds=settings.fair_share_window_s)
    use: dict[str, float] = {}
    for tenant, seconds in s.execute(
            select(Job.tenant_id, func.sum(Job.gpu_seconds))
            .where(Job.finished_at >= since, Job.gpu_seconds.is_not(None)).group_by(Job.tenant_id)):
        use[tenant] = float(seconds or 0.0)
    for tenant, key, count in s.execute(
            select(Job.tenant_id, Job.cost_key, func.count())
            .where(or_(Job.status == JobStatus.running,
                       (Job.status == JobStatus.queued) & Job.chunk_id.is_not(None)))
            .group_by(Job.tenant_id, Job.cost_key)):
        use[tenant] = use.get(tenant, 0.0) + int(count) * costs.get(key, DEFAULT_JOB_GPU_SECONDS)
    running: dict[str, int] = {}
    for tenant, count in s.execute(
            select(Job.tenant_id, func.count(func.distinct(Job.chunk_id)))
            .join(Chunk, Chunk.id == Job.chunk_id)
            .where(Chunk.finished_at.is_(None), Job.status.in_([JobStatus.queued, JobStatus.running]))
            .group_by(Job.tenant_id)):
        running[tenant] = int(count)
    return use, running


def _form_chunks(s: Session, settings: Settings, slots: int, now: datetime) -> list[tuple[str, int]]:
    """Form up to ``slots`` chunks (see the module docstring); returns (chunk id, job count)."""
    formed: list[tuple[str, int]] = []
    holders = _session_holders(s, settings, now)
    for plan in _plan_chunks(s, settings, slots, now):
        chunk_id = chunks.form_chunk(s, plan.job_ids, now, share=plan.share, priority_rank=plan.rank,
                                     preferred_worker=holders.get(plan.session_id) if plan.session_id else None)
        if chunk_id is not None:
            formed.append((chunk_id, len(plan.job_ids)))
    s.commit()
    if formed:
        log.info("dispatcher: formed %d chunk(s) of %s job(s)", len(formed), [n for _, n in formed])
    return formed


def _session_holders(s: Session, settings: Settings, now: datetime) -> dict[str, str]:
    """Session id → the ready worker (heard from within ``worker_dead_after_s``) that holds its
    context in its cache; the most recently heard one when several do."""
    since = now - timedelta(seconds=settings.worker_dead_after_s)
    holders: dict[str, str] = {}
    for worker_id, held in s.execute(select(Worker.id, Worker.sessions).where(
            Worker.state == WorkerState.ready, Worker.last_seen >= since, Worker.sessions.is_not(None))
            .order_by(Worker.last_seen)).all():
        for session_id in held or []:
            holders[session_id] = worker_id
    return holders


def _plan_chunks(s: Session, settings: Settings, slots: int, now: datetime) -> list[_Plan]:
    """The next ``slots`` chunks in fair-share order (see the module docstring), best first;
    writes nothing."""
    costs = job_costs(s)
    rows = s.execute(
        select(Job.id, Job.tenant_id, Job.priority, Job.chunk_key, Job.cost_key, Job.session_id)
        .where(Job.status == JobStatus.queued, Job.chunk_id.is_(None), Job.cancel_requested.is_(False),
               Job.dedupe_of.is_(None), Job.after_job_id.is_(None),
               or_(Job.not_before.is_(None), Job.not_before <= now))
        .order_by(Job.queued_at, Job.position).limit(MAX_CANDIDATES)).all()
    if not rows:
        return []
    waiting: dict[str, list[_Waiting]] = {}
    for job_id, tenant, priority, key, cost_key, session_id in rows:
        waiting.setdefault(tenant, []).append(
            _Waiting(job_id, tenant, str(priority), key, costs.get(cost_key, DEFAULT_JOB_GPU_SECONDS), session_id))
    for queue in waiting.values():  # stable: age order within a priority
        queue.sort(key=lambda w: PRIORITY_RANK.get(w.priority, 1))
    tenants = {t.id: t for t in s.scalars(select(Tenant).where(Tenant.id.in_(list(waiting))))}
    use, running = _tenant_use(s, settings, costs, now)
    plans: list[_Plan] = []
    while len(plans) < slots:
        eligible = [t for t, q in waiting.items() if q and _below_limit(tenants.get(t), running.get(t, 0))]
        if not eligible:
            break

        def share(t: str) -> tuple[float, int]:
            weight = max(float(tenants[t].weight or 1.0), 1e-6) if t in tenants else 1.0
            return use.get(t, 0.0) / weight, PRIORITY_RANK.get(waiting[t][0].priority, 1)

        order = sorted(eligible, key=share)
        head = waiting[order[0]][0]
        head_share, head_rank = share(order[0])
        members: list[_Waiting] = []
        for tenant in order:
            for w in waiting[tenant]:
                if len(members) == settings.chunk_size:
                    break
                if w.chunk_key == head.chunk_key:
                    members.append(w)
        chosen = {w.id for w in members}
        for tenant in {w.tenant_id for w in members}:
            waiting[tenant] = [w for w in waiting[tenant] if w.id not in chosen]
            running[tenant] = running.get(tenant, 0) + 1
        for w in members:
            use[w.tenant_id] = use.get(w.tenant_id, 0.0) + w.cost
        plans.append(_Plan([w.id for w in members], head_share, head_rank, head.session_id))
    return plans


def _below_limit(tenant: Tenant | None, running_chunks: int) -> bool:
    limit = tenant.max_running_chunks if tenant is not None else None
    return limit is None or running_chunks < limit
