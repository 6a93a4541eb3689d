"""Operating the cluster with real processes: scale-in (SIGTERM with drain=finish and
drain=release), the dispatcher killed and restarted, two dispatchers at once, a deadline that
passes while a job runs, GPU-seconds accounting, the backlog metric rising and falling with a
real batch, and a GPU worker's own probes and metrics."""

from __future__ import annotations

import signal
from datetime import timedelta

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from tests.fixtures.worker import Stack, free_port, job_rows, submit_jobs, wait_jobs, wait_until
from worker.models import Chunk, Job, JobCost, WebhookDelivery

LONG_STEPS = 200  # ~7 s of denoising at 512 px on 2 cores: room to act while it runs
LONG_PX = 512
DONE = {"succeeded", "failed", "canceled", "expired"}


def _started(stack: Stack, job_id: str) -> bool:
    return job_rows(stack, [job_id])[0].progress_step >= 2


def test_scale_in_with_drain_finish_completes_the_chunk_and_exits_0(stack: Stack) -> None:
    worker = stack.start("gpu")  # drain=finish is the default
    stack.start("reconciler")
    sub = submit_jobs(stack, 1, steps=LONG_STEPS, px=LONG_PX)
    wait_until(lambda: _started(stack, sub.job_ids[0]), 90, 0.02, "denoising to start")
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(120) == 0
    [row] = job_rows(stack, sub.job_ids)
    assert (row.status, row.attempts, row.progress_step) == ("succeeded", 1, LONG_STEPS - 1)


def test_scale_in_with_drain_release_gives_the_jobs_back_to_another_worker(stack: Stack) -> None:
    first = stack.start("gpu", extra_env={"BAGEL_JOBS_DRAIN": "release"})
    stack.start("reconciler")
    sub = submit_jobs(stack, 1, steps=LONG_STEPS, px=LONG_PX)
    wait_until(lambda: _started(stack, sub.job_ids[0]), 90, 0.02, "denoising to start")
    owner = job_rows(stack, sub.job_ids)[0].lease_owner
    first.signal(signal.SIGTERM)
    assert first.popen.wait(60) == 0
    released = job_rows(stack, sub.job_ids)[0]
    assert released.status == "queued" and released.chunk_id is None and released.attempts == 0
    stack.start("gpu")
    [row] = wait_jobs(stack, sub.job_ids, DONE, timeout_s=180)
    assert row.status == "succeeded" and row.attempts == 1 and row.lease_owner != owner


def test_the_dispatcher_killed_and_restarted_loses_nothing(stack: Stack) -> None:
    stack.start("gpu")
    dispatcher = stack.start("reconciler")
    sub = submit_jobs(stack, 60, steps=2, px=32)
    wait_jobs(stack, sub.job_ids[:8], {"succeeded"}, timeout_s=120)
    dispatcher.kill()  # SIGKILL: its lease stays until it expires (dispatch_lease_s)
    stack.start("reconciler")
    rows = wait_jobs(stack, sub.job_ids, {"succeeded"}, timeout_s=300)
    assert all(r.attempts == 1 for r in rows)
    with stack.session() as s:
        counts = s.scalars(select(Chunk.publish_count).join(Job, Job.chunk_id == Chunk.id)
                           .where(Job.id.in_(sub.job_ids)).distinct()).all()
    assert counts and max(counts) <= 2  # only a message the dead dispatcher had not recorded repeats


def test_two_dispatchers_never_both_publish(stack: Stack) -> None:
    stack.start("gpu")
    # Long enough that a busy CI machine neither stalls a pass past the lease nor keeps a worker
    # between taking a message and claiming its chunk for so long that it looks lost; a stall
    # past the lease is covered by test_scheduler (the fenced publish).
    calm = {"BAGEL_JOBS_DISPATCH_LEASE_S": "30", "BAGEL_JOBS_LOST_MESSAGE_AFTER_S": "60"}
    one, two = stack.start("reconciler", extra_env=calm), stack.start("reconciler", extra_env=calm)
    sub = submit_jobs(stack, 40, steps=2, px=32)
    rows = wait_jobs(stack, sub.job_ids, {"succeeded"}, timeout_s=300)
    assert all(r.attempts == 1 for r in rows)
    with stack.session() as s:
        counts = s.scalars(select(Chunk.publish_count).join(Job, Job.chunk_id == Chunk.id)
                           .where(Job.id.in_(sub.job_ids)).distinct()).all()
    assert counts and set(counts) == {1}
    leaders = [p for p in (one, two) if "holds the lease" in p.log()]
    assert len(leaders) == 1


def test_a_deadline_passing_while_a_job_runs_stops_it_at_the_next_step(stack: Stack, receiver) -> None:
    stack.start("gpu")
    stack.start("reconciler")
    # 1024 px: four times the 512-px work, so that the job outlasts its 4 s deadline on an idle machine too
    sub = submit_jobs(stack, 1, steps=LONG_STEPS, px=2 * LONG_PX, webhook_url=receiver.url, deadline_s=4.0)
    [row] = wait_jobs(stack, sub.job_ids, DONE, timeout_s=60)
    assert (row.status, row.error_code, row.output_key) == ("expired", "deadline_expired", None)
    assert row.started_at is not None and 0 < row.progress_step < LONG_STEPS - 1  # stopped mid-run
    assert row.finished_at - row.deadline_at < timedelta(seconds=5)
    with stack.session() as s:
        assert s.scalars(select(WebhookDelivery.event).where(WebhookDelivery.job_id == row.id)).all() == ["job.expired"]


def _backlog(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "bagel_backlog_gpu_seconds" for sample in family.samples)


def test_the_backlog_metric_rises_and_falls_with_a_real_batch(stack: Stack) -> None:
    stack.start("api")
    url = stack.api_url()
    assert _backlog(url) == 0
    sub = submit_jobs(stack, 24, steps=2, px=32)
    assert _backlog(url) > 0  # waiting work, priced before any GPU worker exists
    stack.start("gpu")
    stack.start("reconciler")
    wait_jobs(stack, sub.job_ids, {"succeeded"}, timeout_s=180)
    assert _backlog(url) == 0


def test_each_job_records_its_share_of_the_chunks_gpu_time_and_its_phases(stack: Stack) -> None:
    stack.start("gpu")
    stack.start("reconciler")
    warm = submit_jobs(stack, 1, steps=2, px=32)  # a worker's first chunk is not a cost sample
    wait_jobs(stack, warm.job_ids, {"succeeded"}, timeout_s=120)
    sub = submit_jobs(stack, 4, steps=3, px=32)  # one chunk of 4 (chunk_size 4)
    rows = wait_jobs(stack, sub.job_ids, {"succeeded"}, timeout_s=120)
    assert len({r.chunk_id for r in rows}) == 1

    def finished_chunk() -> Chunk | None:  # the worker records the chunk's time after its last job
        with stack.session() as s:
            chunk = s.get(Chunk, rows[0].chunk_id)
            return chunk if chunk.gpu_seconds is not None else None

    chunk = wait_until(finished_chunk, 30, 0.05, "the chunk's GPU time to be recorded")
    with stack.session() as s:
        cost = s.get(JobCost, rows[0].cost_key)
    shares = [r.gpu_seconds for r in rows]
    assert all(0 < g <= chunk.gpu_seconds for g in shares)
    assert sum(shares) <= chunk.gpu_seconds * 1.001  # the shares never add up to more than the chunk held
    assert all(r.model_seconds < chunk.gpu_seconds / 2 for r in rows)  # a share, not the chunk's time
    for r in rows:
        assert {"queue", "input", "encode", "prefill", "think", "denoise", "decode", "upload"} <= set(r.phase_seconds)
    # one sample (the warm-up chunk is none): the chunk's time per job, or more when the worker
    # came straight from the warm-up chunk and the hop between them counts too
    assert cost is not None and cost.samples == 1 and cost.avg_gpu_seconds >= chunk.gpu_seconds / 4 * 0.999


def test_a_gpu_worker_serves_its_probes_and_metrics(stack: Stack) -> None:
    port = free_port()
    worker = stack.start("gpu", extra_env={"BAGEL_JOBS_WORKER_HTTP_PORT": str(port)})
    stack.start("reconciler")
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/livez", timeout=5).status_code == 200
    assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200  # engine loaded
    sub = submit_jobs(stack, 4, steps=3, px=32)
    wait_jobs(stack, sub.job_ids, {"succeeded"}, timeout_s=120)
    samples = {s.name: s.value for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text)
               for s in family.samples}
    assert samples["bagel_worker_engine_loaded"] == 1 and samples["bagel_worker_engine_load_seconds"] > 0
    assert samples["bagel_worker_denoise_steps_total"] >= 2 and samples["bagel_worker_steps_per_second"] > 0
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(60) == 0
