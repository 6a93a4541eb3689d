"""OOM-safe GPU workers: real worker processes running the tiny engine with injected faults
(``BAGEL_JOBS_FAULT_INJECTION``) and a memory budget.

Covers: a chunk that runs out of memory is split in halves, not retried, every job still
succeeds, and callbacks and timings stay with their jobs; a job that does not fit on its own fails
at once with ``gpu_out_of_memory`` while its chunk-mate succeeds; a device error gives the chunk's
jobs back to waiting at once (no backoff), ends the worker with a non-zero status without leaving
its message in the broker, and a clean worker finishes the jobs once; the memory budget reaches
the engine. A ``reconciler`` process (its dispatcher) forms the chunks and hands them out. The
row limits and the budget are measured on the same tiny checkpoint in this process (LLM forward
sizes, ``Engine.memory_estimate``), never hard-coded, and each test asserts that the fault
actually fired.

Backends: the device-error test runs on both stacks, because what happens to the late-acked
message (ack, reject, restore) is the broker transport's business. The split and budget tests
run on the SQLite stack only (a worker start costs seconds on 2 cores): their logic lives in
``worker/gpu.py`` and records outcomes through the same ``worker.jobs`` transitions that
``test_worker_chunks.py`` covers on both.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from tests.fixtures.worker import Stack, job_rows, wait_jobs, wait_until
from worker import dispatch, jobs, params, tenants
from worker.queues import GPU_QUEUE
from worker.gpu import EngineHolder, JobInput
from worker.models import WebhookDelivery
from worker.settings import Settings
from worker.storage import make_store
from worker.tasks import DEVICE_ERROR_EXIT_CODE

DONE = {"succeeded", "failed", "canceled"}
STEPS = 2
PX = 32
SHORT_PROMPT = "a red mug"
LONG_PROMPT = " ".join(["a tall red ceramic mug with a chipped handle on a wooden table"] * 12)
SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)


def _input(n: int, prompt: str = SHORT_PROMPT, px: int = PX) -> JobInput:
    """The engine input the worker builds for job ``n`` of ``_submit`` (same prompt and params)."""
    return JobInput(job_id=f"j{n}", task="generate", prompt=f"{prompt} {n}", images=[], think=False,
                    width=px, height=px, params=_params(n))


def _params(n: int) -> dict[str, Any]:
    return params.resolve("generate", {"num_timesteps": STEPS, "seed": n}, False)


def _submit(stack: Stack, jobs_in: list[JobInput], webhook_url: str | None = None) -> list[str]:
    """Submit ``jobs_in`` as one batch of a new tenant; they wait for the dispatcher, which puts
    compatible ones in one chunk. Returns the job ids."""
    with stack.session() as s:
        tenant = tenants.create_tenant(s, f"oom-{uuid.uuid4().hex[:8]}")
        specs = [jobs.JobSpec(task=j.task, prompt=j.prompt, params=j.params, width=j.width, height=j.height)
                 for j in jobs_in]
        _, rows = jobs.submit(s, tenant.id, specs, batch=len(specs) > 1, webhook_url=webhook_url, metadata={},
                              max_attempts=stack.settings.max_attempts)
        return [r.id for r in rows]


@pytest.fixture(scope="module")
def probe(service_model: Path) -> EngineHolder:
    """The workers' checkpoint loaded in this process, to measure forwards and estimates."""
    return EngineHolder(Settings(_env_file=None, model_path=str(service_model), device="cpu"))


def _forward_rows(holder: EngineHolder, inputs: list[JobInput]) -> list[int]:
    """Packed rows of every LLM forward of one engine call over ``inputs``."""
    rows: list[int] = []
    lm = holder.load().model.language_model
    handle = lm.register_forward_pre_hook(lambda _module, args: rows.append(int(args[0].shape[0])))
    try:
        outs = holder.run(inputs, progress=lambda *a: None, should_cancel=lambda i: False)
    finally:
        handle.remove()
    assert [o.error_code for o in outs] == [None] * len(inputs)
    return rows


def _fits_one_not_four(probe: EngineHolder) -> int:
    """A row limit every job of a 4-job chunk fits alone under, and the chunk together does not."""
    limit = max(max(_forward_rows(probe, [_input(n)])) for n in range(4))
    assert max(_forward_rows(probe, [_input(n) for n in range(4)])) > limit
    return limit


def test_holder_splits_an_out_of_memory_chunk_and_keeps_callbacks_on_their_jobs(probe, service_model):
    limit = _fits_one_not_four(probe)
    alone = [probe.run([_input(n)], progress=lambda *a: None, should_cancel=lambda i: False)[0] for n in range(4)]
    faulty = EngineHolder(Settings(_env_file=None, model_path=str(service_model), device="cpu",
                                   fault_injection=f"oom_above_rows:{limit}"))
    steps: dict[int, list[int]] = {}
    outs = faulty.run([_input(n) for n in range(4)],
                      progress=lambda i, step, total: steps.setdefault(i, []).append(step),
                      should_cancel=lambda i: i == 2)

    assert [o.error_code for o in outs] == [None] * 4
    assert [o.canceled for o in outs] == [False, False, True, False]  # cancel reached job 2 only
    for n in (0, 1, 3):  # each job ran alone after the split: its own picture, its own sub-run's stats
        assert outs[n].png == alone[n].png
        assert outs[n].stats["run_denoise_forward_tokens"] == alone[n].stats["run_denoise_forward_tokens"]
        assert outs[n].model_seconds == outs[n].stats["model_seconds"] > 0
        assert steps[n][-1] == STEPS - 1  # progress of job n was reported as job n's
    assert 2 not in steps


@SQLITE_ONLY
def test_out_of_memory_splits_a_chunk_without_a_retry_and_fails_only_the_job_that_cannot_fit_alone(
        stack: Stack, probe) -> None:
    # One worker, two chunks: four short prompts that fit one by one but not together, and a
    # short prompt with a long one whose prefill alone is over the limit.
    short, long = [_input(n) for n in range(5)], _input(5, prompt=LONG_PROMPT)
    limit = max(max(_forward_rows(probe, [job])) for job in short)
    assert max(_forward_rows(probe, short[:4])) > limit
    assert max(_forward_rows(probe, [long])) > limit
    worker = stack.start("gpu", extra_env={"BAGEL_JOBS_FAULT_INJECTION": f"oom_above_rows:{limit}"})
    split_ids = _submit(stack, short[:4])
    mixed_ids = _submit(stack, [short[4], long])
    stack.start("reconciler")  # its first pass sees both batches: the first one fills a chunk (chunk_size 4)

    rows = wait_jobs(stack, split_ids, DONE)
    assert [(r.status, r.attempts, r.error_code) for r in rows] == [("succeeded", 1, None)] * 4
    assert all(r.progress_step == r.progress_total == STEPS - 1 and r.model_seconds > 0 for r in rows)
    store = make_store(stack.settings)
    assert all(Image.open(io.BytesIO(store.get(r.output_key))).size == (PX, PX) for r in rows)

    ok, too_big = wait_jobs(stack, mixed_ids, DONE)
    # same task, size, steps and think: one chunk each
    assert len({r.chunk_id for r in rows}) == 1 and {ok.chunk_id} == {too_big.chunk_id} != {rows[0].chunk_id}
    assert (ok.status, ok.attempts, ok.error_code) == ("succeeded", 1, None)
    assert (too_big.status, too_big.attempts, too_big.error_code) == ("failed", 1, "gpu_out_of_memory")
    assert too_big.error_message.startswith(f"generate job ({PX}x{PX} px output, {STEPS} steps, think off) does "
                                            "not fit in GPU memory: it needs an estimated ")
    assert all(part in too_big.error_message for part in ("MiB", "no memory budget", "running it alone"))

    log = worker.log()
    assert "4 job(s) do not fit together (out of memory: injected fault" in log
    assert "splitting into 2 + 2" in log and "transient failure" not in log


@SQLITE_ONLY
def test_the_memory_budget_reaches_the_engine_and_a_job_over_it_fails_without_a_retry(stack: Stack, probe) -> None:
    small, big = _input(0, px=64), _input(1, px=256)
    need_small, need_big = probe.memory_estimate(small), probe.memory_estimate(big)
    assert need_small < need_big
    budget = (need_small + need_big) // 2
    worker = stack.start("gpu", extra_env={"BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES": str(budget)})
    assert f"GPU memory budget: {budget / 2**20:.1f} MiB (BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES)" in worker.log()
    stack.start("reconciler")
    job_ids = _submit(stack, [small, big])

    ok, over = wait_jobs(stack, job_ids, DONE)
    assert (ok.status, ok.attempts) == ("succeeded", 1)
    assert (over.status, over.attempts, over.error_code) == ("failed", 1, "gpu_out_of_memory")
    assert over.error_message.startswith(f"generate job (256x256 px output, {STEPS} steps, think off) does not fit")
    assert (f"an estimated {need_big / 2**20:.1f} MiB" in over.error_message
            and f"over the {budget / 2**20:.1f} MiB memory budget (BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES)"
            in over.error_message)


def _broker_idle(stack: Stack) -> bool:
    """No message waiting in the gpu queue and (Redis) none delivered but unacknowledged."""
    if dispatch.queue_length(stack.settings, GPU_QUEUE):
        return False
    if stack.kind != "pg-redis-s3":
        return True  # the SQL transport keeps delivered rows hidden, acked or not: the queue is all
    import redis

    with redis.Redis.from_url(stack.settings.broker_url) as client:
        return client.hlen("unacked") == 0


def test_a_device_error_gives_the_chunk_back_and_ends_the_worker(stack: Stack) -> None:
    broken = stack.start("gpu", extra_env={"BAGEL_JOBS_FAULT_INJECTION": "device_error"})
    stack.start("reconciler")
    job_ids = _submit(stack, [_input(0), _input(1)], webhook_url="http://127.0.0.1:9/hook")

    wait_until(lambda: broken.popen.poll() is not None, 60, 0.05, "the broken worker to exit")
    assert broken.popen.returncode == DEVICE_ERROR_EXIT_CODE != 0
    log = broken.log()
    assert "ERROR worker.execution" in log and "device error, giving its 2 job(s) back" in log
    assert f"stopping with exit status {DEVICE_ERROR_EXIT_CODE}" in log
    # The attempt is counted: a job that kills every GPU it touches fails after max_attempts
    # instead of restarting workers forever.
    rows = job_rows(stack, job_ids)
    assert [(r.status, r.attempts, r.error_code, r.lease_owner) for r in rows] == \
        [("queued", 1, "gpu_device_error", None)] * 2
    assert [r.not_before for r in rows] == [None, None]  # given back at once: no backoff for a healthy worker
    assert "device-side assert triggered" in rows[0].error_message

    stack.start("gpu")  # the supervisor's clean process; the dispatcher hands the jobs to it
    rows = wait_jobs(stack, job_ids, DONE)
    assert [(r.status, r.attempts) for r in rows] == [("succeeded", 2)] * 2
    with stack.session() as s:
        events = sorted(s.scalars(select(WebhookDelivery.event)).all())
    assert events == ["batch.completed", "job.succeeded", "job.succeeded"]  # each job finished once
    wait_until(lambda: _broker_idle(stack), 30, 0.1, "every chunk message to be consumed and acked")
