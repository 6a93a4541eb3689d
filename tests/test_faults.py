"""Riding out outages: the whole job stack (real GPU, webhook and reconciler processes) on
throwaway PostgreSQL, Redis and SeaweedFS servers (``fixtures/throwaway.py``) that a test stops
and starts again in the middle of a batch.

Covers: S3 down for two minutes, Redis restarted (every message lost) and PostgreSQL restarted,
each in the middle of a batch of 16 — every job still succeeds, once: one result object each,
one ``job.succeeded`` webhook each, no webhook id twice. And a backlog of 1,000 jobs drained by
two GPU workers with a few jobs put back by a storage error: every job succeeds once, the broker
carries hardly more messages than there are chunks, hardly any message finds nothing to claim,
and no retry starts before its backoff is over.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid

import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.fixtures.throwaway import Servers, ThrowawaySeaweed
from tests.fixtures.worker import Stack, Submitted, job_rows, submit_jobs, wait_jobs, wait_until
from worker import jobs, tenants
from worker.models import Chunk, DeliveryStatus, Job, JobStatus, WebhookDelivery
from worker.dev.receiver import WebhookReceiver
from worker.storage import input_key, make_store, output_key

DONE = {"succeeded", "failed", "canceled", "expired"}
BATCH_JOBS = 16  # chunk_size 4: four chunks, run one after another by one GPU worker
S3_OUTAGE_S = 120
REDIS_DOWN_S = 3
POSTGRES_DOWN_S = 5
RECOVERY_S = 180  # from the end of an outage to the last job finished, on a loaded 2-core machine

BACKLOG_JOBS = 1000
BACKLOG_CHUNK_SIZE = 8  # also the number of edit jobs retried: one chunk
BACKLOG_GENERATE = ((16, 248), (32, 248), (16, 248), (32, 248))  # (px, jobs) per batch: two chunk kinds
BACKLOG_S = 600
MAX_MESSAGES_PER_CHUNK = 1.02
MAX_NO_OP_SHARE = 0.01
NO_OP_LOG = "nothing to claim"  # execution.run_chunk: a message whose turn found no chunk to run


def _start_batch(stack: Stack, receiver: WebhookReceiver) -> Submitted:
    # A lease longer than the outages (production's is 600 s): a worker that rides out a
    # Postgres restart keeps its jobs, so no attempt is spent on the database's fault.
    stack.start("gpu", extra_env={"BAGEL_JOBS_LEASE_S": "30"})
    stack.start("webhooks")
    stack.start("reconciler")
    return submit_jobs(stack, BATCH_JOBS, steps=2, px=32, webhook_url=receiver.url)


def _wait_mid_batch(stack: Stack, sub: Submitted) -> None:
    """Return as soon as the first job of the batch succeeded, with others still to do."""
    def first_succeeded() -> int:
        return sum(row.status == "succeeded" for row in job_rows(stack, sub.job_ids))

    try:
        succeeded = wait_until(first_succeeded, 120, 0.02, "the batch's first job to succeed")
    except AssertionError as exc:  # say where it stuck: the jobs and the last words of each process
        rows = [(r.status, r.attempts, r.error_code) for r in job_rows(stack, sub.job_ids)]
        logs = "\n".join(f"--- {p.name}\n" + "\n".join(p.log().splitlines()[-12:]) for p in stack.procs)
        raise AssertionError(f"{exc}\njobs: {rows}\n{logs}") from exc
    assert succeeded < BATCH_JOBS, "the whole batch finished before the outage began"


def _assert_each_job_succeeded_once(stack: Stack, s3: ThrowawaySeaweed, sub: Submitted,
                                    receiver: WebhookReceiver) -> None:
    rows = wait_jobs(stack, sub.job_ids, DONE, timeout_s=RECOVERY_S)
    assert [(r.id, r.status, r.attempts, r.error_code, r.error_message) for r in rows
            if r.status != "succeeded" or r.attempts != 1] == []  # no attempt spent on the outage
    results = f"{stack.settings.s3_prefix}results/{sub.tenant_id}/"
    expected = sorted(output_key(sub.tenant_id, job_id, "png") for job_id in sub.job_ids)
    assert sorted(r.output_key for r in rows) == expected
    assert sorted(key[len(stack.settings.s3_prefix):] for key in s3.keys(results)) == expected

    def all_delivered() -> bool:  # then nothing is left to send, so nothing can arrive twice later
        with stack.session() as s:
            statuses = s.scalars(select(WebhookDelivery.status)).all()
        return len(statuses) == BATCH_JOBS + 1 and set(statuses) == {DeliveryStatus.delivered}

    wait_until(all_delivered, RECOVERY_S, 0.1, "every webhook (16 job.succeeded, 1 batch.completed) delivered")
    accepted = receiver.accepted()
    ids = [r.headers["webhook-id"] for r in accepted]
    assert sorted({i for i in ids if ids.count(i) > 1}) == []  # no event delivered twice
    assert sorted(r.json()["data"]["job_id"] for r in accepted if r.event == "job.succeeded") == sorted(sub.job_ids)
    assert [r.event for r in accepted].count("batch.completed") == 1


@pytest.mark.timeout(S3_OUTAGE_S + 2 * RECOVERY_S + 120)
def test_s3_down_for_two_minutes_mid_batch_loses_and_repeats_nothing(
        fault_stack: Stack, throwaway: Servers, receiver: WebhookReceiver) -> None:
    sub = _start_batch(fault_stack, receiver)
    _wait_mid_batch(fault_stack, sub)
    throwaway.s3.stop()
    time.sleep(S3_OUTAGE_S)  # the outage itself
    throwaway.s3.start()
    _assert_each_job_succeeded_once(fault_stack, throwaway.s3, sub, receiver)


@pytest.mark.timeout(2 * RECOVERY_S + 120)
def test_redis_restarted_mid_batch_loses_and_repeats_nothing(
        fault_stack: Stack, throwaway: Servers, receiver: WebhookReceiver) -> None:
    sub = _start_batch(fault_stack, receiver)
    _wait_mid_batch(fault_stack, sub)
    throwaway.redis.stop()  # no persistence: every waiting message is gone
    time.sleep(REDIS_DOWN_S)
    throwaway.redis.start()
    _assert_each_job_succeeded_once(fault_stack, throwaway.s3, sub, receiver)


@pytest.mark.timeout(2 * RECOVERY_S + 120)
def test_postgres_restarted_mid_batch_loses_and_repeats_nothing(
        fault_stack: Stack, throwaway: Servers, receiver: WebhookReceiver) -> None:
    sub = _start_batch(fault_stack, receiver)
    _wait_mid_batch(fault_stack, sub)
    throwaway.postgres.stop()  # fast shutdown: every open session is cut
    time.sleep(POSTGRES_DOWN_S)
    throwaway.postgres.start()
    _assert_each_job_succeeded_once(fault_stack, throwaway.s3, sub, receiver)


def _status_counts(stack: Stack) -> dict[str, int]:
    with stack.session() as s:
        return {str(status): n for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}


def _submit_edits(stack: Stack, n: int, webhook_url: str) -> Submitted:
    """``n`` edit jobs of one new tenant on one stored 32-px picture (they form one chunk)."""
    with stack.session() as s:
        tenant_id = tenants.create_tenant(s, f"edits-{uuid.uuid4().hex[:8]}").id
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    png = buf.getvalue()
    sha256 = hashlib.sha256(png).hexdigest()
    key = input_key(tenant_id, sha256)
    make_store(stack.settings).put(key, png, "image/png")
    with stack.session() as s:
        file = jobs.add_file(s, tenant_id, sha256=sha256, storage_key=key, content_type="image/png", fmt="PNG",
                             width=32, height=32, size_bytes=len(png), filename=None)
    return submit_jobs(stack, n, task="edit", input_file_ids=(file.id,), tenant_id=tenant_id, webhook_url=webhook_url)


@pytest.mark.timeout(BACKLOG_S + 180)
def test_a_1000_job_backlog_drains_once_with_few_messages_and_retries_after_their_backoff(
        fault_stack: Stack, throwaway: Servers) -> None:
    stack = fault_stack
    hook = "http://127.0.0.1:9/hook"  # no webhook worker: the outbox rows count the outcomes
    chunk_size = {"BAGEL_JOBS_CHUNK_SIZE": str(BACKLOG_CHUNK_SIZE)}  # the dispatcher forms the chunks
    stack.start("reconciler", extra_env=chunk_size)
    # The jobs retried: a worker whose S3 secret is wrong cannot read their input picture (a
    # storage error, transient for the job), so they go back to waiting until a backoff
    # (Job.not_before) has passed; it is killed before it takes anything else.
    edits = _submit_edits(stack, BACKLOG_CHUNK_SIZE, hook)
    broken = stack.start("gpu", extra_env={"BAGEL_JOBS_S3_SECRET_ACCESS_KEY": "wrong-secret",
                                           "BAGEL_JOBS_RETRY_BACKOFF_S": "2"})

    def put_back() -> bool:  # each job goes back in its own transaction: wait for them all
        return all(row.status == "queued" and row.not_before is not None for row in job_rows(stack, edits.job_ids))

    wait_until(put_back, 120, 0.02, "the broken worker's jobs to wait for their backoff")
    broken.kill()
    subs = [edits] + [submit_jobs(stack, n, steps=2, px=px, webhook_url=hook) for px, n in BACKLOG_GENERATE]
    job_ids = [job_id for sub in subs for job_id in sub.job_ids]
    assert len(job_ids) == BACKLOG_JOBS
    for gpu in [stack.start("gpu", wait=False), stack.start("gpu", wait=False)]:
        gpu.wait_log(" ready.", timeout_s=120)

    def drained() -> bool:
        counts = _status_counts(stack)
        return counts.get("queued", 0) + counts.get("running", 0) == 0

    try:
        wait_until(drained, BACKLOG_S, 0.5, "the backlog to drain")
    except AssertionError as exc:
        logs = "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in stack.procs)
        raise AssertionError(f"{exc}: {_status_counts(stack)}\n{logs}") from exc

    with stack.session() as s:
        rows = s.execute(select(Job.id, Job.status, Job.attempts, Job.error_code, Job.not_before,
                                Job.started_at)).all()
        succeeded_events = dict(s.execute(select(WebhookDelivery.job_id, func.count())
                                          .where(WebhookDelivery.event == "job.succeeded")
                                          .group_by(WebhookDelivery.job_id)).all())
        chunks, messages = s.execute(select(func.count(), func.sum(Chunk.publish_count))).one()
    assert len(rows) == BACKLOG_JOBS
    assert [(r.id, r.status, r.attempts, r.error_code) for r in rows if r.status != JobStatus.succeeded] == []
    assert sorted(succeeded_events.items()) == sorted((job_id, 1) for job_id in job_ids)  # each succeeded once
    keys = [key for sub in subs for key in throwaway.s3.keys(f"{stack.settings.s3_prefix}results/{sub.tenant_id}/")]
    assert len(keys) == len(set(keys)) == BACKLOG_JOBS

    assert messages <= MAX_MESSAGES_PER_CHUNK * chunks, f"{messages} messages for {chunks} chunks"
    no_ops = sum(proc.log().count(NO_OP_LOG) for proc in stack.procs if proc.name == "gpu")
    assert no_ops <= MAX_NO_OP_SHARE * messages, f"{no_ops} of {messages} messages found nothing to claim"

    retried = [r for r in rows if r.not_before is not None]
    assert sorted(r.id for r in retried) == sorted(edits.job_ids)
    assert [(r.id, r.not_before, r.started_at) for r in retried if r.started_at < r.not_before] == []
