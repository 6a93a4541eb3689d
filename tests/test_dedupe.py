"""Exact-request dedupe (issue 12) with real API, GPU worker, reconciler and webhook processes.

Covered, on the embedded stack: a seeded job identical to a succeeded one is answered at
submission — succeeded at once, ``dedupe: hit`` naming the original, zero model and GPU
seconds, the same PNG, no chunk formed, the original's provenance with ``answered_from``, a
``job.succeeded`` event that says so and matches the contract, and the ``bagel_dedupe_hits``
metric; a changed parameter misses, seedless jobs never dedupe, two identical items of one batch
compute once, an original whose record names other weights answers nothing, a tenant that opted
out computes again; the shared result outlives the original's retention while a job answered
from it holds it, and is deleted with the last one. On the production stack: 20 concurrent
identical submissions leave one job to run and 19 waiting on it; when that one is canceled, the
oldest waiting job runs for the rest; the GPU computes once (one chunk of one job) and all 19
succeed with the same result.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from tests.fixtures.contract import assert_event_matches_contract
from tests.fixtures.worker import Stack, wait_until
from worker import tenants
from worker.errors import ObjectNotFound
from worker.models import Chunk, Job, utcnow
from worker.reconciler import _expire_results
from worker.storage import make_store

SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
POSTGRES_ONLY = pytest.mark.parametrize("stack_base", ["pg-redis-s3"], indirect=True)
TIMEOUT_S = 60.0
GENERATE = {"task": "generate", "prompt": "a red mug on a desk", "width": 32, "height": 32,
            "params": {"num_timesteps": 2, "seed": 3}}


def _client(stack: Stack, name: str) -> tuple[httpx.Client, str]:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, name)
        key = tenants.create_api_key(s, tenant.id)[1]
        tenant_id = tenant.id
    client = httpx.Client(base_url=stack.api_url(), headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S)
    return client, tenant_id


def _submit(api: httpx.Client, body: dict) -> dict:
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def _finished(api: httpx.Client, job_id: str) -> dict:
    def done() -> dict | None:
        job = api.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    job = wait_until(done, 240, 0.25)
    assert job["status"] == "succeeded", job["error"]
    return job


def _chunks(stack: Stack) -> list[tuple[str, int]]:
    with stack.session() as s:
        return [(c.id, c.job_count) for c in s.scalars(select(Chunk)).all()]


def _png(api: httpx.Client, job: dict) -> bytes:
    return api.get(job["result"]["url"]).content


@SQLITE_ONLY
def test_an_identical_seeded_job_is_answered_without_a_gpu(stack: Stack, receiver) -> None:
    for role in ("api", "reconciler", "gpu", "webhooks"):
        stack.start(role)
    api, tenant_id = _client(stack, "acme")
    hooked = dict(GENERATE, webhook_url=receiver.url)
    first = _submit(api, hooked)
    assert first["dedupe"] == "miss" and first["dedupe_of"] is None
    first = _finished(api, first["id"])
    png = _png(api, first)
    assert len(_chunks(stack)) == 1

    hit = _submit(api, hooked)  # answered at submission: no chunk, no GPU time
    assert (hit["status"], hit["dedupe"], hit["dedupe_of"]) == ("succeeded", "hit", first["id"])
    assert hit["timings"]["gpu_seconds"] == 0 and hit["timings"]["model_seconds"] == 0
    assert _png(api, hit) == png and len(_chunks(stack)) == 1
    prov = api.get(f"/v1/jobs/{hit['id']}/provenance").json()
    first_prov = api.get(f"/v1/jobs/{first['id']}/provenance").json()
    assert prov["answered_from"] == first["id"] and prov["output_sha256"] == first_prov["output_sha256"]
    events = {item.json()["data"]["job_id"]: item.json() for item in receiver.wait_for("job.succeeded", count=2)}
    event = events[hit["id"]]
    assert_event_matches_contract(event)
    assert (event["data"]["dedupe"], event["data"]["dedupe_of"], event["data"]["gpu_seconds"]) == \
        ("hit", first["id"], 0.0)
    assert events[first["id"]]["data"]["dedupe"] == "miss"

    changed = _submit(api, dict(GENERATE, params={"num_timesteps": 3, "seed": 3}))  # another parameter: a miss
    assert changed["dedupe"] == "miss" and _finished(api, changed["id"])["timings"]["gpu_seconds"] > 0
    seedless = [_submit(api, dict(GENERATE, params={"num_timesteps": 2})) for _ in range(2)]
    for job in seedless:  # no seed: never answered from another job, never waits on one
        assert job["dedupe"] is None and job["dedupe_of"] is None
        assert _finished(api, job["id"])["timings"]["gpu_seconds"] > 0
    assert len(_chunks(stack)) >= 2

    batch = api.post("/v1/batches", json={"task": "generate", "width": 32, "height": 32,
                                          "params": {"num_timesteps": 2},
                                          "items": [{"prompt": "a blue vase", "seed": 5}] * 2})
    assert batch.status_code == 202, batch.text
    pair = [_finished(api, job_id) for job_id in batch.json()["job_ids"]]
    runner = next(job for job in pair if job["dedupe"] == "miss")
    twin = next(job for job in pair if job["id"] != runner["id"])
    assert (twin["dedupe"], twin["dedupe_of"], twin["timings"]["gpu_seconds"]) == ("hit", runner["id"], 0)
    assert _png(api, twin) == _png(api, runner)

    metrics = api.get("/metrics").text
    assert f'bagel_dedupe_hits{{tenant="{tenant_id}"}} 2.0' in metrics

    with stack.session() as s:  # the original's record names other weights: it answers nothing now
        record = dict(s.scalar(select(Job.provenance).where(Job.id == first["id"])))
        s.execute(update(Job).where(Job.id == first["id"]).values(provenance={**record, "weights_sha256": "0" * 64}))
        s.commit()
    other_weights = _submit(api, GENERATE)
    assert other_weights["dedupe"] == "miss" and other_weights["status"] == "queued"
    _finished(api, other_weights["id"])

    with stack.session() as s:
        assert tenants.quality_settings(s, tenant_id, dedupe=False)["dedupe"] is False
    opted_out = _submit(api, GENERATE)
    assert opted_out["dedupe"] is None and opted_out["status"] == "queued"
    _finished(api, opted_out["id"])

    # Retention: the original expires first, but the job answered from it still holds the object.
    store = make_store(stack.settings)
    retention = stack.settings.model_copy(update={"result_retention_s": 3600})
    key = f"results/{tenant_id}/{first['id']}.png"
    old = utcnow() - timedelta(hours=2)
    with stack.session() as s:
        s.execute(update(Job).where(Job.id == first["id"]).values(finished_at=old))
        s.commit()
    assert _expire_results(retention, stack.session, store) == 1
    assert api.get(f"/v1/jobs/{first['id']}").json()["result"]["expired"] is True
    assert store.get(key) == png and _png(api, api.get(f"/v1/jobs/{hit['id']}").json()) == png
    with stack.session() as s:
        s.execute(update(Job).where(Job.id == hit["id"]).values(finished_at=old))
        s.commit()
    assert _expire_results(retention, stack.session, store) == 1
    with pytest.raises(ObjectNotFound):
        store.get(key)


@POSTGRES_ONLY
def test_twenty_concurrent_identical_submissions_compute_once(stack: Stack) -> None:
    stack.start("api")
    api, _ = _client(stack, "acme")
    barrier = threading.Barrier(20)

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=stack.api_url(), headers=api.headers, timeout=TIMEOUT_S) as own:
            barrier.wait()
            return own.post("/v1/jobs", json=GENERATE)

    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(post, range(20)))
    assert all(r.status_code == 202 for r in replies), [r.text for r in replies if r.status_code != 202]
    ids = [r.json()["id"] for r in replies]
    with stack.session() as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids))).all()}
    runners = [job_id for job_id, job in rows.items() if job.dedupe_of is None]
    assert len(runners) == 1, f"{len(runners)} jobs run for one request"
    runner = runners[0]
    assert all(job.dedupe_of == runner for job_id, job in rows.items() if job_id != runner)
    waiting = api.get(f"/v1/jobs/{ids[0] if ids[0] != runner else ids[1]}").json()
    assert (waiting["dedupe"], waiting["dedupe_of"], waiting["status"]) == ("waiting", runner, "queued")

    assert api.post(f"/v1/jobs/{runner}/cancel").json()["status"] == "canceled"
    with stack.session() as s:  # the oldest waiting job runs instead; the others wait on it
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids))).all()}
    successors = [job_id for job_id, job in rows.items() if job_id != runner and job.dedupe_of is None]
    assert len(successors) == 1
    successor = successors[0]
    rest = [job_id for job_id in ids if job_id not in (runner, successor)]
    assert all(rows[job_id].dedupe_of == successor for job_id in rest)

    stack.start("reconciler")
    stack.start("gpu")
    done = [_finished(api, job_id) for job_id in [successor, *rest]]
    assert _chunks(stack) == [(_chunks(stack)[0][0], 1)]  # one chunk, of one job: computed once
    assert {job["result"]["url"].split("?")[0] for job in done} == {done[0]["result"]["url"].split("?")[0]}
    assert done[0]["timings"]["gpu_seconds"] > 0 and done[0]["dedupe"] == "miss"
    assert all(job["dedupe"] == "hit" and job["dedupe_of"] == successor and job["timings"]["gpu_seconds"] == 0
               for job in done[1:])
    with stack.session() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.dedupe_of == successor)) == 18
