"""Exact-request dedupe: a deterministic job the service has already answered, or is answering,
is not computed again.

Owns: the request hash (``request_hash``: task, prompt, the input pictures' SHA-256s, every
resolved parameter — the seed, the adapter scale and the quality gate among them — think, the
output size and the adapter's weights hash), which jobs qualify (``qualifies``: a seed given by
the caller, the tenant not opted out, not a re-run, whose point is to compute again), the fleet's
model identity (``fleet_identity``: the weights hash and quantization every live GPU worker
reports), and placing new jobs (``place``): a job whose hash matches

- a succeeded job of the same tenant whose result is still kept and whose record names the
  fleet's weights and quantization, is answered from it at once (``transitions.answer_twin``);
- a job of the same tenant still waiting or running for that hash (its *runner*), waits on it
  (``dedupe_of``) and never reaches a GPU: it succeeds with the runner's result, or runs itself
  if the runner ends without one (``transitions``);
- nothing: it runs itself. The partial unique index ``ux_jobs_dedupe_leader`` lets one job per
  tenant and hash run itself at a time, so concurrent identical submissions agree on one runner:
  a submission that loses the race places its jobs again against the winner.

A job answered this way reports ``dedupe: hit``, the original's id, and zero model and
GPU-seconds. Leaves the state changes to ``transitions.py`` and ``jobs.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from worker.models import ACTIVE_STATUSES, Job, JobStatus, Worker, WorkerState
from worker.transitions import answer_twin

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings

log = logging.getLogger(__name__)

HASH_VERSION = 1  # bumped when what the hash covers changes: older hashes then never match
PLACE_TRIES = 5  # a submission that keeps losing races to other runners gives up dedupe


@dataclass(frozen=True)
class Reuse:
    """When a finished job may answer a new one: its record names the fleet's model identity
    (``fleet_identity`` of the live workers heard from within ``dead_after_s``) and its result
    is still kept (finished within ``retention_s``)."""

    dead_after_s: float
    retention_s: float

    @classmethod
    def of(cls, settings: Settings) -> Reuse:
        return cls(settings.worker_dead_after_s, settings.result_retention_s)


def request_hash(*, task: str, prompt: str, input_sha256s: list[str], params: dict[str, Any], think: bool,
                 width: int | None, height: int | None, adapter_sha256: str | None) -> str:
    """The hash of everything that decides a deterministic job's output, model aside (the model's
    identity is checked against the original's record, ``Reuse``)."""
    doc = {"v": HASH_VERSION, "task": task, "prompt": prompt, "inputs": input_sha256s, "params": params,
           "think": think, "width": width, "height": height, "adapter": adapter_sha256}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def qualifies(*, seed_given: bool, tenant_dedupe: bool, rerun: bool) -> bool:
    """Only a request whose output is fixed by its content (a seed given) qualifies; a tenant
    may opt out; a re-run exists to compute again."""
    return seed_given and tenant_dedupe and not rerun


def fleet_identity(session: Session, dead_after_s: float, now: datetime) -> tuple[str, str] | None:
    """``(weights_sha256, quantization)`` when every live GPU worker (heard from within
    ``dead_after_s``, not draining) has loaded the same model the same way; else None."""
    since = now - timedelta(seconds=dead_after_s)
    rows = session.execute(select(Worker.weights_sha256, Worker.quantization).where(
        Worker.last_seen >= since, Worker.state != WorkerState.draining).distinct()).all()
    if len(rows) != 1 or rows[0][0] is None or rows[0][1] is None:
        return None
    return rows[0][0], rows[0][1]


def place(session: Session, tenant_id: str, values: list[dict[str, Any]], now: datetime,
          reuse_with: Reuse | None) -> list[str]:
    """Insert the job rows ``values`` (dicts for one INSERT, each with ``request_hash``, None
    for jobs that do not qualify), each waiting on its original when it has one; answer at once
    the ones whose original already succeeded. Returns the ids of those answered. No commit."""
    for _ in range(PLACE_TRIES):
        originals, runners = _originals(session, tenant_id, values, reuse_with, now)
        own: dict[str, str] = {}  # hash → the job of this submission that runs for it
        for row in values:
            digest = row["request_hash"]
            if digest is None:
                row["dedupe_of"] = None
                continue
            row["dedupe_of"] = originals.get(digest) or runners.get(digest) or own.get(digest)
            if row["dedupe_of"] is None:
                own[digest] = row["id"]
        leading = [row for row in values if row["request_hash"] is not None and row["dedupe_of"] is None]
        if not leading:
            break
        try:
            with session.begin_nested():
                session.execute(insert(Job), leading)
        except IntegrityError:  # another submission's runner for one of these hashes committed first
            log.info("dedupe: lost a race for a runner of %d hash(es); placing again", len(leading))
            continue
        break
    else:
        log.warning("dedupe: %d job(s) run without dedupe after %d lost races", len(values), PLACE_TRIES)
        for row in values:
            row["request_hash"] = row["dedupe_of"] = None
        leading = []
    inserted = {row["id"] for row in leading}
    rest = [row for row in values if row["id"] not in inserted]
    if rest:
        session.execute(insert(Job), rest)
    answered = []
    finished = {row["id"]: row["dedupe_of"] for row in rest if row["dedupe_of"] in originals.values()}
    for job_id, original_id in finished.items():
        original = session.get(Job, original_id)
        if original is not None and answer_twin(session, job_id, original, now):
            answered.append(job_id)
    if answered:
        log.info("dedupe: %d job(s) answered from earlier results", len(answered))
    return answered


def _originals(session: Session, tenant_id: str, values: list[dict[str, Any]], reuse_with: Reuse | None,
               now: datetime) -> tuple[dict[str, str], dict[str, str]]:
    """Per request hash of ``values``: a succeeded job that may answer it, and the job running
    for it."""
    hashes = {row["request_hash"] for row in values if row["request_hash"] is not None}
    if not hashes:
        return {}, {}
    runners = dict(session.execute(select(Job.request_hash, Job.id).where(
        Job.tenant_id == tenant_id, Job.request_hash.in_(hashes), Job.dedupe_of.is_(None),
        Job.status.in_(list(ACTIVE_STATUSES)))).all())
    originals: dict[str, str] = {}
    identity = fleet_identity(session, reuse_with.dead_after_s, now) if reuse_with is not None else None
    if reuse_with is not None and identity is not None:
        weights, quantization = identity
        for digest, job_id, record in session.execute(
                select(Job.request_hash, Job.id, Job.provenance).where(
                    Job.tenant_id == tenant_id, Job.request_hash.in_(hashes), Job.dedupe_of.is_(None),
                    Job.status == JobStatus.succeeded, Job.result_expired_at.is_(None),
                    Job.finished_at > now - timedelta(seconds=reuse_with.retention_s))
                .order_by(Job.finished_at.desc())):
            record = record or {}
            if (digest not in originals and record.get("weights_sha256") == weights
                    and record.get("quantization") == quantization):
                originals[digest] = job_id
    return originals, runners
