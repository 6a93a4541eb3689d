"""Orphan objects: stored inputs and results that no row holds, and the sweep that deletes them.

Owns: deciding which objects are orphans, and ``sweep_orphans``, which the reconciler runs every
``orphan_sweep_interval_s``. An object is an orphan when it is older than ``orphan_grace_s`` and
- under ``inputs/``: no ``File`` row names its tenant and content (an upload whose API died, or
  whose transaction failed, between the object write and the commit);
- under ``adapters/``: no ``Adapter`` row names its tenant and weights hash (an adapter upload
  that died before its commit, or an adapter deleted while its files could not be);
- under ``results/``: its job does not hold it — the job is gone, its result expired, or it ended
  without recording it (its worker lost the lease after the upload) — nor does a job answered
  from that job's result (``worker.dedupe``). A result is the output and, for a job with the
  quality gate, every attempt's image (``models.result_keys``). The result key of a job
  still queued or running is kept: a worker may be about to record it.
A younger object may belong to a write whose row is still being committed, so it is never
judged. Keys outside the layout of ``storage.py`` are left alone.

Safe with several reconcilers: deleting a deleted object is a no-op. Inputs and adapters are
content-addressed, so an upload of the same bytes may rewrite an orphan and commit its row while
the sweep decides: the sweep reads such an object before deleting it, looks for a row again after
the delete, and puts the same bytes back if one appeared. (What remains is an upload that wrote before the delete and
commits after that second look, a few milliseconds, for content whose earlier upload died more
than the grace period ago; uploading it again repairs it.) Leaves listing and deleting to
``storage.py`` and the schedule to ``reconciler.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import TYPE_CHECKING

from sqlalchemy import or_, select

from worker.errors import ObjectNotFound
from worker.models import (
    ACTIVE_STATUSES,
    Adapter,
    File,
    Job,
    JobStatus,
    result_keys,
    utcnow,
)
from worker.storage import (
    ADAPTERS_PREFIX,
    INPUTS_PREFIX,
    RESULTS_PREFIX,
    StoredObject,
    content_type_for,
    key_owner,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.storage import ResultStore

log = logging.getLogger(__name__)

PAGE_KEYS = 500  # listed keys looked up in the database with one query


@dataclass
class SweepReport:
    """What one sweep did (logged, and asserted on by tests)."""

    inputs: int = 0  # orphan inputs deleted
    adapters: int = 0  # orphan adapter files deleted
    results: int = 0  # orphan results deleted
    young: int = 0  # objects within the grace period, not judged
    restored: int = 0  # inputs or adapter files put back: a row appeared while they were deleted


def sweep_orphans(session: Callable[[], Session], store: ResultStore, grace_s: float) -> SweepReport:
    """Delete the orphans older than ``grace_s`` seconds under ``inputs/``, ``adapters/`` and
    ``results/``."""
    report = SweepReport()
    cutoff = utcnow() - timedelta(seconds=grace_s)
    for page in _pages(store.list_objects(INPUTS_PREFIX)):
        old = _older_than(page, cutoff, report)
        with session() as s:
            orphans = old - _named(s, old, File)
        for key in sorted(orphans):
            _delete_content(session, store, key, report, File)
    for page in _pages(store.list_objects(ADAPTERS_PREFIX)):
        old = _older_than(page, cutoff, report)
        with session() as s:
            orphans = old - _named(s, old, Adapter)
        for key in sorted(orphans):
            _delete_content(session, store, key, report, Adapter)
    for page in _pages(store.list_objects(RESULTS_PREFIX)):
        old = _older_than(page, cutoff, report)
        with session() as s:
            orphans = old - _held_results(s, old)
        for key in sorted(orphans):
            store.delete(key)
            report.results += 1
            log.debug("orphan sweep: deleted result %s", key)
    if report.inputs or report.results or report.adapters or report.restored:
        log.info("orphan sweep: deleted %d input(s), %d result(s) and %d adapter file(s) that no row holds, "
                 "older than %g s (%d younger object(s) kept, %d put back)", report.inputs, report.results,
                 report.adapters, grace_s, report.young, report.restored)
    return report


def _pages(objects: Iterable[StoredObject]) -> Iterator[list[StoredObject]]:
    it = iter(objects)
    while page := list(islice(it, PAGE_KEYS)):
        yield page


def _older_than(page: list[StoredObject], cutoff: datetime, report: SweepReport) -> set[str]:
    old = {o.key for o in page if o.modified_at <= cutoff}
    report.young += len(page) - len(old)
    return old


def _named(s: Session, keys: set[str], model: type[File] | type[Adapter]) -> set[str]:
    """The content-addressed keys (inputs: ``File``; adapter files: ``Adapter``) a row names by
    tenant and sha256, and those outside the layout (not ours to judge)."""
    owners = {key: key_owner(key) for key in keys}
    pairs = {owner for owner in owners.values() if owner is not None}
    if not pairs:
        return set(keys)
    rows = s.execute(select(model.tenant_id, model.sha256).where(
        model.tenant_id.in_({tenant for tenant, _ in pairs}), model.sha256.in_({sha for _, sha in pairs}))).all()
    named = {(r.tenant_id, r.sha256) for r in rows}
    return {key for key, owner in owners.items() if owner is None or owner in named}


def _held_results(s: Session, keys: set[str]) -> set[str]:
    """The result keys a job holds or may still record, and those outside the layout. A key
    names the job that made it; the jobs answered from that job's result hold it too."""
    owners = {key: key_owner(key) for key in keys}
    job_ids = {owner[1] for owner in owners.values() if owner is not None}
    rows = s.execute(select(Job.id, Job.status, Job.output_key, Job.quality, Job.result_expired_at)
                     .where(or_(Job.id.in_(job_ids), Job.dedupe_of.in_(job_ids)))).all() if job_ids else []
    active = {r.id for r in rows if JobStatus(r.status) in ACTIVE_STATUSES}
    held = {key for r in rows if r.result_expired_at is None for key in result_keys(r.output_key, r.quality)}
    return {key for key, owner in owners.items()
            if owner is None or owner[1] in active or key in held}


def _delete_content(session: Callable[[], Session], store: ResultStore, key: str, report: SweepReport,
                    model: type[File] | type[Adapter]) -> None:
    """Delete a content-addressed orphan (an input or an adapter file), and put the same bytes
    back if an upload of them committed its row meanwhile."""
    try:
        data = store.get(key)  # content-addressed: any copy of it is these bytes
    except ObjectNotFound:
        return  # another reconciler swept it first
    store.delete(key)
    owner = key_owner(key)
    assert owner is not None, "only keys of the layout are judged"
    tenant_id, sha256 = owner
    with session() as s:  # an upload of the same bytes may have committed its row meanwhile
        row = s.scalar(select(model).where(model.tenant_id == tenant_id, model.sha256 == sha256))
    what = "input" if model is File else "adapter file"
    if row is None:
        if model is File:
            report.inputs += 1
        else:
            report.adapters += 1
        log.debug("orphan sweep: deleted %s %s", what, key)
        return
    store.put(key, data, row.content_type if isinstance(row, File) else content_type_for(key))
    report.restored += 1
    log.warning("orphan sweep: %s %s got its row %s while it was swept; put back", what, key, row.id)
