"""Running one chunk: claim → read inputs → engine → upload → complete, with the failure policy.

Owns: the body of the ``bagel_jobs.run_chunk`` task. It claims the chunk's queued jobs under a
lease, reads their input images from storage (once per file), runs them through the GPU module
in one call (progress written every ``progress_every_steps`` steps, the lease renewed by a heartbeat
thread, cancel requests polled between steps; the quality gate's questions per job from
``quality.py``), uploads outputs (and the gate's other attempts) to deterministic keys and records each outcome
through ``worker.jobs`` (which writes the webhook outbox rows in the same transaction), each with
its reproducibility record (``provenance.py``).

Failure policy: a permanent error (bad input, a job that does not fit in GPU memory on its own)
fails the job at once; a transient one of the job's own (an engine crash) puts it back to
waiting until ``max_attempts``, not dispatched again before a capped exponential backoff
(``Job.not_before``). A dependency's outage is not the job's fault and spends no attempt
(``outages.py``): storage unreachable while reading inputs puts the jobs back to waiting after a
jittered backoff, within ``outage_budget_s``; storage failing after the engine ran keeps the
outputs and the leases until it answers (``_upload_when_back``); the worker takes no chunk while
its storage is down; database writes wait for the database to answer again. A device error (``DeviceFailure``: the CUDA context is gone) puts the whole
chunk back to waiting at once, counting the attempt so a job that kills every GPU it touches
ends ``failed`` after ``max_attempts`` instead of restarting workers forever, and re-raises for
the task to end the process. With ``drain=release`` a worker told to stop (SIGTERM) stops the
engine at the next step boundary and releases the unfinished jobs for another worker; with
``drain=finish`` (the default) it finishes the chunk first. A job whose deadline passes while it
runs stops at the next step and ends ``expired``. The dispatcher (``scheduler.py``) hands
waiting jobs out again; nothing here publishes.

Accounting: a chunk's GPU time is how long it held the worker (and its GPU): from the claim
to the last job recorded. A job's share is the input read and engine call divided by the jobs
it ran (they are alike: one chunk key) plus its own upload; its phases are the engine's
(encode, prefill, think, denoise, decode) with its queue wait, the chunk's input read and its
upload around them. The job kind's moving average (``job_costs``), the unit of ETAs and of the
backlog metric, takes per chunk its time per job — measured from the end of the worker's
previous chunk when the worker was busy, so the hops between chunks count — except a worker's
first chunk, which pays one-time warm-up costs.
Leaves engine details to ``gpu.py``, ending the process to ``tasks.py`` and every state change
to ``jobs.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from worker import chunks, dispatch, jobs, provenance, quality, sessions
from worker.adapters import adapter_source
from worker.errors import (
    BrokerUnavailable,
    DeviceFailure,
    ObjectNotFound,
    StorageUnavailable,
)
from worker.logs import log_context
from worker.models import File, Job, Tenant, utcnow
from worker.outages import DATABASE_ERRORS, outage_code, outage_delay_s, until_database
from worker.params import engine_prompt
from worker.storage import attempt_key, output_key

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.gpu import JobOutput
    from worker.tasks import WorkerRuntime

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
CANCEL_POLL_S = 0.2
BACK_TO_BACK_S = 1.0  # a chunk claimed this soon after the worker's previous one ended: it was busy
PROGRESS_MIN_INTERVAL_S = 0.25


@dataclass
class ClaimedJob:
    """A plain snapshot of a claimed job row (safe to use after its session closed)."""

    id: str
    tenant_id: str
    batch_id: str | None
    task: str
    prompt: str
    input_file_ids: list[str]
    params: dict
    think: bool
    width: int
    height: int
    attempts: int
    deferrals: int
    cost_key: str
    queued_at: datetime
    started_at: datetime
    deadline_at: datetime | None
    adapter_id: str | None = None
    session_id: str | None = None


def backoff_s(base_s: float, attempt: int) -> float:
    """Delay before retry number ``attempt`` (1-based): base·2^(attempt−1), capped."""
    return min(base_s * (2 ** max(attempt - 1, 0)), MAX_BACKOFF_S)


class _ChunkMonitor:
    """The engine's callbacks (throttled progress writes, cancel polling) plus a heartbeat
    thread renewing the chunk's lease every lease_s/3: long phases without denoising steps
    (prefill, think text, VAE decode) must not let the lease lapse."""

    def __init__(self, rt: WorkerRuntime, job_ids: list[str], deadlines: dict[str, datetime]) -> None:
        self.rt = rt
        self.job_ids = job_ids
        self.deadlines = deadlines  # job id → deadline, for the jobs that have one
        self.every = rt.settings.progress_every_steps
        self.last_cancel_poll = 0.0
        self.canceled: set[str] = set()
        self.pending: dict[int, tuple[int, int]] = {}
        self.last_flush = 0.0
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew_loop, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> _ChunkMonitor:
        if self.job_ids:
            self._heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()

    def _renew_loop(self) -> None:
        interval = max(self.rt.settings.lease_s / 3.0, 0.2)
        while not self._stop.wait(interval):
            try:
                with self.rt.session() as session:
                    jobs.renew_lease(session, self.job_ids, self.rt.worker_id, self.rt.settings.lease_s)
            except Exception:  # noqa: BLE001 - a missed renewal is retried next interval
                log.warning("lease renewal for %d job(s) failed", len(self.job_ids), exc_info=True)

    def progress(self, index: int, step: int, total: int) -> None:
        if index == 0:  # one denoising step of the chunk's loop
            self.rt.stats.steps(1)
        if step % self.every and step != total:
            return
        self.pending[index] = (step, total)
        if step == total or time.monotonic() - self.last_flush >= PROGRESS_MIN_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        groups: dict[tuple[int, int], list[str]] = {}
        for index, st in self.pending.items():
            groups.setdefault(st, []).append(self.job_ids[index])
        self.pending.clear()
        self.last_flush = time.monotonic()
        if not groups:
            return
        try:
            with self.rt.session() as session:
                for (step, total), ids in groups.items():
                    jobs.record_progress(session, ids, self.rt.worker_id, step, total)
        except DATABASE_ERRORS:  # progress is advisory: the engine goes on, the next write catches up
            log.warning("progress of %d job(s) not recorded (database unavailable)", len(self.job_ids))

    def should_cancel(self, index: int) -> bool:
        if self.rt.shutting_down.is_set() and self.rt.settings.drain == "release":
            return True
        deadline = self.deadlines.get(self.job_ids[index])
        if deadline is not None and utcnow() >= deadline:
            return True
        now = time.monotonic()
        if now - self.last_cancel_poll >= CANCEL_POLL_S:
            self.last_cancel_poll = now
            try:
                with self.rt.session() as session:
                    self.canceled = set(jobs.cancel_requested_ids(session, self.job_ids))
            except DATABASE_ERRORS:  # asked again at the next poll; the engine goes on meanwhile
                log.warning("cancel requests not read (database unavailable)")
        return self.job_ids[index] in self.canceled


def _claim(rt: WorkerRuntime, session: Session) -> tuple[str | None, list[ClaimedJob]]:
    chunk_id, rows = chunks.claim_next(session, rt.worker_id, rt.settings.lease_s,
                                       affinity_s=rt.settings.session_affinity_s)
    return chunk_id, [
        ClaimedJob(id=j.id, tenant_id=j.tenant_id, batch_id=j.batch_id, task=j.task, prompt=j.prompt,
                   input_file_ids=list(j.input_file_ids or []), params=dict(j.params or {}), think=bool(j.think),
                   width=int(j.width or 1024), height=int(j.height or 1024), attempts=int(j.attempts),
                   deferrals=int(j.deferrals or 0), cost_key=j.cost_key, queued_at=j.queued_at,
                   started_at=j.started_at, deadline_at=j.deadline_at, adapter_id=j.adapter_id,
                   session_id=j.session_id)
        for j in rows]


def _read_inputs(rt: WorkerRuntime, claimed: list[ClaimedJob]) -> tuple[dict[str, bytes], dict[str, str]]:
    """Bytes per file id (each read once) and a permanent error per job whose file is gone."""
    wanted = {fid for job in claimed for fid in job.input_file_ids}
    with rt.session() as session:
        rows = session.execute(select(File.id, File.tenant_id, File.storage_key).where(File.id.in_(wanted))).all()
    keys = {fid: (tenant, key) for fid, tenant, key in rows}
    data: dict[str, bytes] = {}
    missing: dict[str, str] = {}
    for job in claimed:
        for n, fid in enumerate(job.input_file_ids):
            if fid in data:
                continue
            entry = keys.get(fid)
            if entry is None or entry[0] != job.tenant_id:
                missing[job.id] = f"input_file_ids[{n}]: file {fid} does not exist"
                continue
            try:
                data[fid] = rt.store.get(entry[1])  # StorageUnavailable propagates: transient
            except ObjectNotFound:
                missing[job.id] = f"input_file_ids[{n}]: object for file {fid} is missing from storage"
    return data, missing


def run_chunk(rt: WorkerRuntime, message_chunk_id: str) -> None:
    """Take a turn: run the first published chunk in the dispatch order (``chunks.claim_next``),
    usually the message's own ``message_chunk_id``; a turn with nothing to claim does nothing.
    A worker whose storage is unreachable first waits for it (``outages.StorageGate``)."""
    if not rt.storage_gate.wait_until_up(rt):
        log.warning("message for chunk %s: not taken, the worker stopped while its storage was unreachable",
                    message_chunk_id)
        return
    chunk_id, claimed = until_database(rt, lambda session: _claim(rt, session), "claiming a chunk")
    if chunk_id is None:
        log.info("message for chunk %s: nothing to claim (done, canceled or taken by another turn)",
                 message_chunk_id)
        return
    log.info("chunk %s: claimed %d job(s) as %s (message for %s)", chunk_id, len(claimed), rt.worker_id,
             message_chunk_id)
    rt.stats.chunk_started(chunk_id)
    if rt.registration is not None:
        rt.registration.set_chunk(chunk_id)
    gpu_seconds = 0.0
    try:
        gpu_seconds = _run_claimed(rt, chunk_id, claimed)
    finally:
        try:
            with rt.session() as session:
                chunks.finish_chunk(session, chunk_id, gpu_seconds)
        except Exception:  # noqa: BLE001 - the dispatcher closes a chunk left with no active job
            log.warning("chunk %s: could not record its end; the dispatcher will", chunk_id, exc_info=True)


def _run_claimed(rt: WorkerRuntime, chunk_id: str, claimed: list[ClaimedJob]) -> float:
    """Run the claimed jobs and record every outcome; returns the seconds the chunk held the worker."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    engine_s = 0.0
    try:
        read_started = time.perf_counter()
        files, missing = _read_inputs(rt, claimed)
        adapter = adapter_source(rt.session, rt.store, claimed[0].adapter_id, claimed[0].params)
        phases["input"] = time.perf_counter() - read_started
        holder = rt.holder()
        from worker.gpu import JobInput

        contexts = _session_contexts(rt, claimed, missing)
        runnable = [job for job in claimed if job.id not in missing]
        question_sets = _question_sets(rt, runnable)
        inputs = [JobInput(job_id=job.id, task=job.task, prompt=engine_prompt(job.task, job.prompt),
                           images=[files[fid] for fid in job.input_file_ids if fid in files], think=job.think,
                           width=job.width, height=job.height, params=job.params,
                           gate=quality.spec_for(job.task, job.prompt, job.params, question_sets.get(job.tenant_id)),
                           parts=contexts.get(job.id), session_id=job.session_id)
                      for job in runnable]
        deadlines = {job.id: job.deadline_at for job in runnable if job.deadline_at is not None}
        with _ChunkMonitor(rt, [job.id for job in runnable], deadlines) as monitor:
            engine_started = time.perf_counter()
            outputs = (holder.run(inputs, progress=monitor.progress, should_cancel=monitor.should_cancel,
                                  adapter=adapter) if inputs else [])
            engine_s = time.perf_counter() - engine_started
            monitor.flush()
        if rt.registration is not None and any(job.session_id for job in runnable):
            rt.registration.set_sessions(holder.sessions.keys())
    except DeviceFailure as exc:
        log.error("chunk %s: device error, giving its %d job(s) back and ending this worker: %s", chunk_id,
                  len(claimed), exc, exc_info=True)
        try:
            _retry(rt, chunk_id, claimed, exc.code, str(exc), backoff=False)
        except Exception:  # noqa: BLE001 - the process must end anyway; the leases will expire
            log.exception("chunk %s: could not put its jobs back; the reconciler will once their leases "
                          "expire", chunk_id)
        raise
    except Exception as exc:  # noqa: BLE001 - a dependency's outage waits; anything else is retried, then failed
        outage = outage_code(exc)
        if outage is not None:
            if outage == StorageUnavailable.code:
                rt.storage_gate.down(rt, str(exc))
            _defer(rt, chunk_id, claimed, outage, f"{type(exc).__name__}: {exc}")
        else:
            code = getattr(exc, "code", "engine_error")
            log.warning("chunk %s: transient failure %s: %s", chunk_id, code, exc, exc_info=True)
            _retry(rt, chunk_id, claimed, code, f"{type(exc).__name__}: {exc}")
        return time.perf_counter() - started

    for job_id, message in missing.items():
        until_database(rt, lambda s, job_id=job_id, message=message: jobs.fail_job(
            s, job_id, rt.worker_id, "unknown_file", message), "recording a failure")
    # The quality gate's extra rounds are the time of the jobs they ran for; the rest is shared.
    shared_s = engine_s - sum(out.regeneration_seconds for out in outputs)
    shares = _Shares((phases["input"] + shared_s) / max(len(runnable), 1), shared_s / max(len(runnable), 1), phases)
    kept: list[tuple[ClaimedJob, JobOutput]] = []
    release: list[str] = []
    finished = 0
    for job, out in zip(runnable, outputs, strict=True):
        outcome = _record(rt, job, out, shares)
        if outcome == "kept":
            kept.append((job, out))
        elif outcome == "release":
            release.append(job.id)
        else:
            finished += 1
    if kept:
        finished += _upload_when_back(rt, chunk_id, kept, shares)
    if release:
        until_database(rt, lambda s: jobs.release_jobs(s, release, rt.worker_id), "releasing jobs")
        log.warning("chunk %s: worker shutting down, released %d job(s)", chunk_id, len(release))
    ended = time.perf_counter()
    held_s = ended - started
    # The cost sample: the chunk's time on the worker, or, when the worker went straight from its
    # last chunk to this one (busy), the whole cycle since the last one ended — claims and broker
    # hops between chunks included, which is what a backlog really costs. A worker's first chunk
    # warms it up and is no sample, nor is a chunk that waited for storage.
    busy = rt.last_chunk_end is not None and started - rt.last_chunk_end < BACK_TO_BACK_S
    cycle_s = ended - rt.last_chunk_end if busy else held_s
    first_run, rt.last_chunk_end = rt.last_chunk_end is None, ended
    if runnable and engine_s > 0 and not release and not kept and not first_run:
        try:
            with rt.session() as session:
                jobs.record_cost(session, runnable[0].cost_key, cycle_s / len(runnable))
        except DATABASE_ERRORS:
            log.warning("chunk %s: cost sample not recorded (database unavailable)", chunk_id)
    _nudge(rt)
    log.info("chunk %s: %d job(s) finished in %.2f s (%.3f GPU-seconds each)", chunk_id,
             finished + len(missing), held_s, held_s / max(len(runnable), 1))
    return held_s


def _session_contexts(rt: WorkerRuntime, claimed: list[ClaimedJob], missing: dict[str, str]) -> dict[str, list]:
    """Each session turn's context parts (``sessions.context_parts``); a turn whose context lost
    a stored picture fails (into ``missing``). Storage that does not answer propagates."""
    out: dict[str, list] = {}
    for job in claimed:
        if job.session_id is None:
            continue
        with rt.session() as session:
            row = session.get(Job, job.id)
            try:
                out[job.id] = sessions.context_parts(session, rt.store, row)
            except ObjectNotFound as exc:
                missing[job.id] = f"session_id: the session's context cannot be rebuilt ({exc})"
    return out


def _question_sets(rt: WorkerRuntime, claimed: list[ClaimedJob]) -> dict[str, dict[str, list[str]]]:
    """The quality-gate question sets of the tenants whose jobs ask for the gate (``worker.quality``)."""
    tenants = {job.tenant_id for job in claimed if job.params.get("quality_gate")}
    if not tenants:
        return {}
    with rt.session() as session:
        rows = session.execute(select(Tenant.id, Tenant.gate_questions).where(Tenant.id.in_(tenants))).all()
    return {tenant: questions for tenant, questions in rows if questions}


def _store_attempts(rt: WorkerRuntime, job: ClaimedJob, out: JobOutput, key: str) -> dict | None:
    """Store the quality gate's other attempts beside the result; its record with every
    attempt's key (the chosen one's is the result's)."""
    if out.quality is None or out.attempts is None:
        return None
    gate_record = {**out.quality, "attempts": [dict(a) for a in out.quality["attempts"]]}
    for n, png in enumerate(out.attempts):
        if n == out.chosen:
            gate_record["attempts"][n]["output_key"] = key
            continue
        other = attempt_key(job.tenant_id, job.id, n)
        rt.store.put(other, png, "image/png")
        gate_record["attempts"][n]["output_key"] = other
    return gate_record


@dataclass
class _Shares:
    """A chunk's time divided among its jobs: input read + engine, engine alone, chunk phases."""

    gpu_s: float
    engine_s: float
    phases: dict[str, float]


def _record(rt: WorkerRuntime, job: ClaimedJob, out: JobOutput, shares: _Shares) -> str:
    """Store and record one job's outcome; returns 'done', 'release' (the worker is stopping)
    or 'kept' (the upload failed: the output is kept for ``_upload_when_back``)."""
    with log_context(job_id=job.id, batch_id=job.batch_id, tenant_id=job.tenant_id):
        record = provenance.record(rt.holder().provenance(), job, out, rt.worker_id)
        if out.error_code is not None:
            until_database(rt, lambda s: jobs.fail_job(s, job.id, rt.worker_id, out.error_code,
                                                       out.error_message or out.error_code, provenance=record),
                           "recording a failure")
            log.info("job %s failed permanently: %s", job.id, out.error_code)
            return "done"
        if out.canceled:
            if until_database(rt, lambda s: jobs.mark_canceled(s, job.id, rt.worker_id), "recording a cancel"):
                log.info("job %s canceled between steps", job.id)
                return "done"
            if until_database(rt, lambda s: jobs.mark_expired(s, job.id, rt.worker_id), "recording an expiry"):
                log.info("job %s stopped at its deadline", job.id)
                return "done"
            return "release" if rt.shutting_down.is_set() else "done"
        upload_started = time.perf_counter()
        gate_record = None
        try:
            if out.png is not None:
                key = output_key(job.tenant_id, job.id, "png")
                rt.store.put(key, out.png, "image/png")
                gate_record = _store_attempts(rt, job, out, key)
            else:
                key = output_key(job.tenant_id, job.id, "txt")
                rt.store.put(key, (out.text or "").encode(), "text/plain; charset=utf-8")
        except Exception as exc:  # noqa: BLE001 - storage trouble of any kind: keep the output, wait for storage
            log.warning("job %s: upload failed (%s: %s); output kept until storage answers", job.id,
                        type(exc).__name__, exc)
            rt.storage_gate.down(rt, f"upload failed: {type(exc).__name__}: {exc}")
            return "kept"
        phases = {"queue": max((job.started_at - job.queued_at).total_seconds(), 0.0), **shares.phases,
                  **{name[len("phase_"):-len("_seconds")]: float(v) for name, v in out.stats.items()
                     if name.startswith("phase_") and name.endswith("_seconds")},
                  "upload": time.perf_counter() - upload_started}
        ok = until_database(rt, lambda s: jobs.complete_job(
            s, job.id, rt.worker_id, output_key=key, output_text=out.text, think_text=out.think_text,
            model_seconds=shares.engine_s + out.regeneration_seconds,
            gpu_seconds=shares.gpu_s + out.regeneration_seconds + phases["upload"],
            phase_seconds={name: round(v, 4) for name, v in phases.items()}, provenance=record,
            quality=gate_record),
            "recording a result")
        if ok:
            log.info("job %s succeeded in %.3f s of model time (its share of the chunk)", job.id, shares.engine_s)
        else:
            log.warning("job %s: lease lost before completion, result %s left for the new owner", job.id, key)
        return "done"


def _upload_when_back(rt: WorkerRuntime, chunk_id: str, kept: list[tuple[ClaimedJob, JobOutput]],
                      shares: _Shares) -> int:
    """Storage failed after the engine ran: keep the outputs and the jobs' leases, wait for
    storage (``StorageGate``, up to ``outage_budget_s``), then upload and record them — nothing
    is recomputed. A worker told to stop meanwhile gives the jobs back without spending an
    attempt; past the budget they fail with ``dependency_outage``. Returns how many were recorded."""
    log.warning("chunk %s: %d output(s) kept until storage answers", chunk_id, len(kept))
    deadline = time.monotonic() + rt.settings.outage_budget_s
    recorded = 0
    with _ChunkMonitor(rt, [job.id for job, _ in kept], {}):  # renews their leases while waiting
        while kept and rt.storage_gate.wait_until_up(rt, deadline):
            still = []
            for job, out in kept:
                if _record(rt, job, out, shares) == "kept":
                    still.append((job, out))
                else:
                    recorded += 1
            kept = still
    if kept and rt.shutting_down.is_set():
        _defer(rt, chunk_id, [job for job, _ in kept], StorageUnavailable.code,
               "storage was unreachable when the worker stopped; the output is computed again elsewhere")
    elif kept:
        for job, _ in kept:
            until_database(rt, lambda s, job=job: jobs.fail_job(
                s, job.id, rt.worker_id, jobs.DEPENDENCY_OUTAGE,
                f"storage unreachable for more than the outage budget ({rt.settings.outage_budget_s:.0f} s)"),
                "recording a failure")
    return recorded


def _retry(rt: WorkerRuntime, chunk_id: str, claimed: list[ClaimedJob], code: str, message: str, *,
           backoff: bool = True) -> None:
    """The jobs' own failure: back to waiting after a backoff, spending the attempt (``retry_or_fail``)."""
    requeued = 0
    for job in claimed:
        delay = backoff_s(rt.settings.retry_backoff_s, job.attempts) if backoff else 0.0
        status = until_database(rt, lambda s, job=job, delay=delay: jobs.retry_or_fail(
            s, job.id, rt.worker_id, code, message, delay_s=delay), "putting a job back")
        if status == "queued":
            requeued += 1
        else:
            log.error("job %s failed after %d attempt(s): %s", job.id, job.attempts, message)
    if requeued:
        log.warning("chunk %s: %d job(s) back to waiting (%s)%s", chunk_id, requeued, code,
                    " after a backoff" if backoff else "")
    _nudge(rt)


def _defer(rt: WorkerRuntime, chunk_id: str, claimed: list[ClaimedJob], code: str, message: str) -> None:
    """A dependency's outage, not the jobs' fault: back to waiting after a capped, jittered
    backoff without spending an attempt (``jobs.defer_job``), up to the outage budget."""
    waiting = 0
    for job in claimed:
        delay = outage_delay_s(rt.settings, job.deferrals)
        status = until_database(rt, lambda s, job=job, delay=delay: jobs.defer_job(
            s, job.id, rt.worker_id, code, message, delay_s=delay, budget_s=rt.settings.outage_budget_s),
            "putting a job back")
        waiting += status == "queued"
    log.warning("chunk %s: %s; %d of %d job(s) wait for it without using an attempt", chunk_id, code, waiting,
                len(claimed))
    _nudge(rt)


def _nudge(rt: WorkerRuntime) -> None:
    try:
        dispatch.nudge_webhooks(rt.settings)
    except BrokerUnavailable as exc:
        log.warning("webhook nudge not sent (%s); the reconciler nudges on its next tick", exc)
