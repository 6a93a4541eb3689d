"""The Python SDK (``bagel_client``) and ``bagel-jobs submit`` against the real service: the API,
GPU worker (tiny checkpoint), webhook worker and reconciler as processes on both stacks, and the
real webhook receiver.

Covered: the SDK imports nothing but httpx, standardwebhooks and the standard library (checked
in a throwaway virtual environment holding only those); a try-on batch through ``Client`` with
progress, downloads and its ``batch.completed`` webhook verified (a tampered body refused); one
job through ``AsyncClient``; a 429 retried after the API's ``Retry-After``; ``ApiError`` fields;
cursor listings, idempotency keys and cancel; a LoRA adapter uploaded (PEFT's folder, or its two
files as bytes and a file object), listed, read, used by a try-on batch and deleted; a finished
job's provenance and a re-run that makes the same PNG (both clients), a 409 provenance before a
worker ran the job; a quality-gated job (``QualityGate``) that keeps both attempts, each
downloadable, and the identical request (as ``QualityGate``, as a dict, as a batch item over the
batch's gate) answered by dedupe, a batch item without its own gate taking the batch's; a
session through ``AsyncClient`` (opening parts with an uploaded picture, an edit turn replayed by
its idempotency key, a question turn that sees it, both turns' jobs waited, the transcript in
order, the session deleted); the ``submit tryon`` command's images, manifest (with the gate's
verdict and the dedupe state), exit codes, ``--adapter`` and ``--quality-threshold``; and the
README's "Using it from Python" examples (a try-on batch, a session), run as written.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bagel.identity import weights_identity
from bagel_client import (
    ApiError,
    AsyncClient,
    Client,
    QualityGate,
    RetryPolicy,
    Turn,
    WebhookVerificationError,
    verify_webhook,
)
from bagel_client.errors import ResultUnavailable
from tests.fixtures.adapters import make_test_adapter
from tests.fixtures.worker import ROOT, Stack
from worker import tenants
from worker.dev.demo import product_image
from worker.dev.receiver import WebhookReceiver
from worker.models import Job, ModelSession

PRODUCT_PX = 64
STEPS = 2
SCENES = ["on a marble counter, morning light", "on a beach at sunset", "in a snowy forest"]
WAIT_S = 240.0
SDK_DEPENDENCIES = ("httpx", "standardwebhooks")
SERVER_MODULES = ("api", "worker", "bagel", "torch", "sqlalchemy", "fastapi", "pydantic", "celery", "PIL", "numpy")
SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)


def _tenant(stack: Stack) -> tuple[str, str, str]:
    """(tenant id, API key, webhook secret) of a new tenant."""
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "shop")
        _, key = tenants.create_api_key(s, tenant.id)
        return tenant.id, key, tenant.webhook_secret


def _product(tmp_path: Path) -> Path:
    path = tmp_path / "bag.png"
    path.write_bytes(product_image(PRODUCT_PX))
    return path


def _png_size(data: bytes) -> tuple[int, int]:
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG"
    return picture.size


# ---------------------------------------------------------------------------------------------
# Dependencies


def _distribution_closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions ``names`` need, theirs included (requirements behind an
    extra left out; those for other Python versions are skipped when not installed)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for requirement in dist.requires or []:
            if "extra ==" not in requirement.partition(";")[2]:
                todo.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    return seen


def _install_links(dist_name: str, site: Path) -> set[str]:
    """Link a distribution's top-level packages and its metadata into ``site``; their names."""
    dist = metadata.distribution(dist_name)
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    names = set()
    for top in tops:
        source = Path(str(dist.locate_file(top)))
        if source.exists() and not (site / top).exists() and top != "__pycache__":
            (site / top).symlink_to(source)
            names.add(top.removesuffix(".py"))
    return names


# Run inside the throwaway environment: import everything, build the CLI's parser, a client, and
# verify a webhook signed there; report what got imported and whether any server module exists.
ISOLATED_SCRIPT = """
import argparse, importlib.util, json, sys
from datetime import datetime, timezone
import bagel_client, bagel_client.cli, standardwebhooks

bagel_client.cli.add_arguments(argparse.ArgumentParser())
bagel_client.Client("http://127.0.0.1:9", "bj_test").close()
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
body = '{"type": "webhook.test", "timestamp": "2026-01-01T00:00:00+00:00", "data": {}}'
now = datetime.now(timezone.utc)
headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(int(now.timestamp())),
           "Webhook-Signature": standardwebhooks.Webhook(secret).sign("msg_1", now, body)}
assert bagel_client.verify_webhook(secret, headers, body.encode()).type == "webhook.test"
missing = [m for m in %(server)r if importlib.util.find_spec(m) is not None]
loaded = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__"})
print(json.dumps({"loaded": loaded, "server_modules_installed": missing}))
"""


def test_the_sdk_needs_only_httpx_standardwebhooks_and_the_standard_library(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    allowed = {"bagel_client"}
    for dist in _distribution_closure(SDK_DEPENDENCIES):
        allowed |= _install_links(dist, site)
    (site / "bagel_client").symlink_to(ROOT / "bagel_client")

    run = subprocess.run([str(python), "-I", "-c", ISOLATED_SCRIPT % {"server": SERVER_MODULES}],
                         capture_output=True, text=True, cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")},
                         check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["server_modules_installed"] == []  # the environment really lacks them
    assert set(report["loaded"]) <= allowed, set(report["loaded"]) - allowed
    assert "bagel_client" in report["loaded"] and "httpx" in report["loaded"]


# ---------------------------------------------------------------------------------------------
# Through the real service


def test_the_sync_client_runs_a_tryon_batch_and_verifies_its_webhook(stack: Stack, receiver: WebhookReceiver,
                                                                      tmp_path: Path) -> None:
    for role in ("api", "gpu", "webhooks", "reconciler"):
        stack.start(role)
    _, key, secret = _tenant(stack)
    seen: list[tuple[int, int]] = []
    with Client(stack.api_url(), key) as client:
        batch = client.tryon(_product(tmp_path), SCENES, seed=1, params={"num_timesteps": STEPS},
                             webhook_url=receiver.url, metadata={"sku": "mug-1"})
        assert batch.job_count == len(SCENES) and batch.job_ids is not None and len(batch.job_ids) == len(SCENES)
        final = client.wait(batch, progress=lambda done, total: seen.append((done, total)), timeout_s=WAIT_S,
                            poll_s=0.05)
        assert final.is_completed and final.counts["succeeded"] == len(SCENES)
        jobs = client.batch_jobs(final)
        files = [client.download(job, tmp_path / "out" / f"{job.position}.png") for job in jobs]
        listed = list(client.list_batches(page_size=1))

    done = [d for d, _ in seen]
    assert done == sorted(set(done)) and seen[0][0] < len(SCENES)  # each change reported once, upwards
    assert seen[-1] == (len(SCENES), len(SCENES)) and {t for _, t in seen} == {len(SCENES)}
    assert [j.id for j in jobs] == batch.job_ids
    assert [j.prompt for j in jobs] == SCENES and [j.params["seed"] for j in jobs] == [1, 2, 3]
    for job, path in zip(jobs, files, strict=True):
        assert job.status == "succeeded" and job.input_file_ids == jobs[0].input_file_ids  # one upload
        assert _png_size(path.read_bytes()) == (job.width, job.height) == (PRODUCT_PX, PRODUCT_PX)
    assert [b.id for b in listed] == [batch.id] and listed[0].metadata == {"sku": "mug-1"}

    hook = receiver.wait_for("batch.completed", timeout_s=60)[0]
    event = verify_webhook(secret, hook.headers, hook.body)
    assert event.type == "batch.completed" and event.id == hook.headers["webhook-id"]
    assert [j["job_id"] for j in event.data["jobs"]] == batch.job_ids
    assert {j["status"] for j in event.data["jobs"]} == {"succeeded"}
    tampered = hook.body.replace(b'"succeeded"', b'"failed"', 1)
    assert tampered != hook.body
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(secret, hook.headers, tampered)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(tenants.new_webhook_secret(), hook.headers, hook.body)  # another tenant's secret


def test_the_async_client_runs_one_tryon_job(stack: Stack, tmp_path: Path) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    _, key, _ = _tenant(stack)
    seen: list[tuple[int, int]] = []

    async def scenario() -> tuple[object, ...]:
        async with AsyncClient(stack.api_url(), key) as client:
            product = await client.upload(product_image(PRODUCT_PX), filename="bag.png")
            job = await client.submit_job("tryon", "on a beach at sunset", input_files=[product], seed=7,
                                          params={"num_timesteps": STEPS})
            final = await client.wait(job, progress=lambda done, total: seen.append((done, total)),
                                      timeout_s=WAIT_S, poll_s=0.05)
            path = await client.download(final, tmp_path)
            listed = [j.id async for j in client.list_jobs(task="tryon")]
            return product, job, final, path, listed

    product, job, final, path, listed = asyncio.run(scenario())
    assert product.width == product.height == PRODUCT_PX and product.filename == "bag.png"
    assert job.status == "queued" and job.input_file_ids == [product.id]
    assert final.status == "succeeded" and final.params["seed"] == 7
    total = STEPS - 1  # denoising steps counted by the worker: the schedule's intervals
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted({d for d, _ in seen})
    assert path == tmp_path / f"{job.id}.png"
    assert _png_size(path.read_bytes()) == (final.width, final.height) == (PRODUCT_PX, PRODUCT_PX)
    assert listed == [job.id]


def test_a_rate_limited_submit_is_retried_after_the_apis_retry_after(stack: Stack, caplog: pytest.LogCaptureFixture
                                                                      ) -> None:
    stack.start("api")
    tenant_id, key, _ = _tenant(stack)
    with stack.session() as s:
        tenants.set_limits(s, tenant_id, {"requests_per_minute": 1})
    with Client(stack.api_url(), key) as client:
        first = client.submit_job("generate", "a red mug", width=32, height=32)
        # The minute's one submission was made 57 s ago: the API's Retry-After is a few seconds.
        with stack.session() as s:
            row = s.get(Job, first.id)
            row.created_at = row.created_at - timedelta(seconds=57)
            s.commit()

        with Client(stack.api_url(), key, retry=RetryPolicy(max_retries=0)) as impatient, \
                pytest.raises(ApiError) as refused:
            impatient.submit_job("generate", "a blue mug", width=32, height=32)
        assert refused.value.status == 429 and refused.value.code == "rate_limited"
        assert refused.value.retry_after_s is not None and 1 <= refused.value.retry_after_s <= 3
        assert "requests_per_minute" in refused.value.message

        caplog.set_level(logging.WARNING, logger="bagel_client")
        started = time.monotonic()
        second = client.submit_job("generate", "a blue mug", width=32, height=32)
        waited = time.monotonic() - started

    retries = [r.getMessage() for r in caplog.records if r.name == "bagel_client.retries"]
    assert len(retries) == 1 and "POST /v1/jobs: 429 rate_limited, retry 1 of 4" in retries[0], retries
    assert retries[0].endswith("(Retry-After)")
    delay = float(re.search(r"in ([0-9.]+) s", retries[0]).group(1))
    assert delay >= 1 and waited >= delay  # it slept the whole Retry-After before sending again
    assert second.status == "queued" and second.id != first.id


def test_api_errors_carry_the_services_code_message_and_field(stack: Stack) -> None:
    stack.start("api")
    _, key, _ = _tenant(stack)
    with Client(stack.api_url(), key) as client:
        with pytest.raises(ApiError) as invalid:
            client.submit_job("generate", "a red mug", width=32, height=32, seed=-1)
        with pytest.raises(ApiError) as missing:
            client.get_job("no-such-job")
        with pytest.raises(ApiError) as bad_upload:
            client.upload(b"not a picture", filename="notes.txt")
    with Client(stack.api_url(), "bj_not-a-key") as stranger, pytest.raises(ApiError) as unauthorized:
        stranger.get_batch("any")

    assert (invalid.value.status, invalid.value.code, invalid.value.field) == (422, "invalid_input", "seed")
    assert invalid.value.message.startswith("seed: ") and "(limit: >= 0)" in invalid.value.message
    assert str(invalid.value) == f"HTTP 422 invalid_input: {invalid.value.message}"
    assert (missing.value.status, missing.value.code, missing.value.field) == (404, "not_found", "job_id")
    assert (bad_upload.value.status, bad_upload.value.code, bad_upload.value.field) == (422, "invalid_image", "file")
    assert (unauthorized.value.status, unauthorized.value.field) == (401, "Authorization")


def test_listings_follow_cursors_keys_replay_and_cancel_stops_a_queued_job(stack: Stack, tmp_path: Path) -> None:
    stack.start("api")  # no GPU worker: the jobs stay queued
    _, key, _ = _tenant(stack)
    with Client(stack.api_url(), key) as client:
        jobs = [client.submit_job("generate", f"a mug {i}", width=32, height=32) for i in range(3)]
        again = client.submit_job("generate", "a mug 0", width=32, height=32, idempotency_key="mug-0")
        replayed = client.submit_job("generate", "a mug 0", width=32, height=32, idempotency_key="mug-0")
        listed = [j.id for j in client.list_jobs(page_size=2)]  # two pages
        canceled = client.cancel(jobs[0])
        with pytest.raises(ResultUnavailable, match="status canceled"):
            client.download(canceled, tmp_path / "x.png")
        batch = client.submit_batch([{"prompt": "a mug"}, {"prompt": "a cup", "seed": 5}], task="generate",
                                    width=32, height=32)
        canceled_batch = client.cancel(batch)

    assert len({j.id for j in jobs} | {again.id}) == 4  # a fresh key per call: four jobs
    assert replayed.id == again.id  # the same key: the first answer again
    assert listed == [again.id, *reversed([j.id for j in jobs])]
    assert canceled.status == "canceled"
    assert canceled_batch.counts["canceled"] == 2 and canceled_batch.is_completed


# ---------------------------------------------------------------------------------------------
# Adapters, provenance and re-runs


@SQLITE_ONLY
def test_the_sync_client_manages_an_adapter_tries_on_with_it_and_reruns_a_job(stack: Stack, service_model: Path,
                                                                                tmp_path: Path) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    _, key, _ = _tenant(stack)
    folder = make_test_adapter(service_model, tmp_path / "adapter", rank=4, seed=1)
    with Client(stack.api_url(), key) as client:
        adapter = client.upload_adapter("brand-a", folder)
        listed, read = client.list_adapters(), client.get_adapter(adapter.id)
        batch = client.tryon(_product(tmp_path), SCENES[:2], seed=1, params={"num_timesteps": STEPS},
                             adapter=adapter, adapter_scale=0.5)
        final = client.wait(batch, timeout_s=WAIT_S, poll_s=0.05)
        jobs = client.batch_jobs(final)
        png = client.result_bytes(jobs[0])
        provenance = client.get_provenance(jobs[0])
        again = client.wait(client.rerun(jobs[0]), timeout_s=WAIT_S, poll_s=0.05)
        png_again = client.result_bytes(again)
        client.delete_adapter(adapter)
        remaining = client.list_adapters()
        with pytest.raises(ApiError) as gone:
            client.get_adapter(adapter.id)

    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert (adapter.name, adapter.rank, adapter.size_bytes) == ("brand-a", 4, len(weights))
    assert adapter.sha256 == hashlib.sha256(weights).hexdigest() and adapter.target_modules
    assert listed == [adapter] and read == adapter
    assert final.counts["succeeded"] == 2
    assert [(j.adapter, j.params["adapter_scale"], j.rerun_of) for j in jobs] == [(adapter.id, 0.5, None)] * 2

    assert (provenance.job_id, provenance.status, provenance.rerun_of) == (jobs[0].id, "succeeded", None)
    assert provenance.weights_sha256 == weights_identity(service_model)
    assert (provenance.adapter_id, provenance.adapter_scale) == (adapter.id, 0.5)
    assert provenance.params == jobs[0].params and provenance.seed == 1 and provenance.task == "tryon"
    assert provenance.output_sha256 == hashlib.sha256(png).hexdigest() and provenance.recorded_at is not None

    assert (again.rerun_of, again.adapter, again.batch_id, again.status) == (jobs[0].id, adapter.id, None,
                                                                             "succeeded")
    assert again.params == jobs[0].params and png_again == png  # the same PNG, bit for bit
    assert remaining == [] and (gone.value.status, gone.value.code) == (404, "not_found")


@SQLITE_ONLY
def test_the_async_client_uploads_an_adapter_and_reruns_a_job(stack: Stack, service_model: Path,
                                                              tmp_path: Path) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    _, key, _ = _tenant(stack)
    folder = make_test_adapter(service_model, tmp_path / "adapter", rank=4, seed=2)
    config = (folder / "adapter_config.json").read_bytes()
    weights = io.BytesIO((folder / "adapter_model.safetensors").read_bytes())

    async def scenario() -> tuple[object, ...]:
        async with AsyncClient(stack.api_url(), key) as client:
            adapter = await client.upload_adapter("brand-b", (config, weights))
            job = await client.submit_job("generate", "a red mug on a desk", width=32, height=32, seed=3,
                                          params={"num_timesteps": STEPS}, adapter=adapter.id)
            first = await client.wait(job, timeout_s=WAIT_S, poll_s=0.05)
            same = await client.wait(await client.rerun(first), timeout_s=WAIT_S, poll_s=0.05)
            other = await client.rerun(first, seed=4, idempotency_key="redo-4")
            replayed = await client.rerun(first, seed=4, idempotency_key="redo-4")
            other = await client.wait(other, timeout_s=WAIT_S, poll_s=0.05)
            pngs = [await client.result_bytes(j) for j in (first, same, other)]
            provenance = await client.get_provenance(same)
            return adapter, first, same, other, replayed, pngs, provenance

    adapter, first, same, other, replayed, pngs, provenance = asyncio.run(scenario())
    assert adapter.rank == 4 and first.adapter == same.adapter == other.adapter == adapter.id
    assert same.rerun_of == other.rerun_of == first.id and replayed.id == other.id  # the key replays
    assert other.params == {**first.params, "seed": 4}
    assert pngs[1] == pngs[0] != pngs[2]  # the same request, the same PNG; another seed, another
    assert provenance.rerun_of == first.id and provenance.output_sha256 == hashlib.sha256(pngs[1]).hexdigest()


def test_provenance_is_refused_until_a_worker_ran_the_job_and_a_rerun_of_a_queued_job_is_queued(
        stack: Stack) -> None:
    stack.start("api")  # no GPU worker: the jobs stay queued
    _, key, _ = _tenant(stack)
    with Client(stack.api_url(), key) as client:
        job = client.submit_job("generate", "a red mug", width=32, height=32, seed=3)
        with pytest.raises(ApiError) as not_recorded:
            client.get_provenance(job)
        redo = client.rerun(job.id, num_timesteps=3, cfg_text_scale=5.0)
        with pytest.raises(ApiError) as invalid:
            client.rerun(job, seed=-1)

    assert (not_recorded.value.status, not_recorded.value.code) == (409, "provenance_not_recorded")
    assert not_recorded.value.field == "job_id" and "queued" in not_recorded.value.message
    assert (redo.rerun_of, redo.status, redo.adapter) == (job.id, "queued", None)
    assert redo.params == {**job.params, "num_timesteps": 3, "cfg_text_scale": 5.0}
    assert (invalid.value.status, invalid.value.field) == (422, "seed")


# ---------------------------------------------------------------------------------------------
# Quality gate and exact-request dedupe


def test_a_gated_job_keeps_both_attempts_and_the_identical_request_is_answered_by_dedupe(stack: Stack) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)  # the GPU worker reports its model identity, which dedupe needs
    _, key, _ = _tenant(stack)
    prompt, seed = "a red mug on a desk", 11
    request = {"width": 32, "height": 32, "seed": seed, "params": {"num_timesteps": STEPS}}
    gate = QualityGate(threshold=1.0, max_regenerations=1)  # nothing scores 1.0: two attempts, best effort
    with Client(stack.api_url(), key) as client:
        submitted = client.submit_job("generate", prompt, quality_gate=gate, **request)
        first = client.wait(submitted, timeout_s=WAIT_S, poll_s=0.05)
        png = client.result_bytes(first)
        assert first.quality is not None
        pictures = [httpx.get(a.url, timeout=30).raise_for_status().content for a in first.quality.attempts
                    if a.url is not None]
        hit = client.submit_job("generate", prompt, quality_gate=gate, **request)
        as_dict = client.submit_job("generate", prompt, quality_gate={"threshold": 1.0, "max_regenerations": 1},
                                    **request)
        hit_png = client.result_bytes(hit)
        # Item 0's own gate is the first job's (a hit); item 1 takes the batch's, another request.
        batch = client.submit_batch([{"prompt": prompt, "seed": seed, "quality_gate": gate},
                                     {"prompt": prompt, "seed": seed}], task="generate", width=32, height=32,
                                    params={"num_timesteps": STEPS},
                                    quality_gate={"threshold": 0.0, "max_regenerations": 0})
        items = client.batch_jobs(client.wait(batch, timeout_s=WAIT_S, poll_s=0.05))

    assert (submitted.dedupe, submitted.dedupe_of, submitted.quality) == ("miss", None, None)
    assert first.status == "succeeded" and first.params["quality_gate"] == {"threshold": 1.0, "max_regenerations": 1}
    record = first.quality
    assert (record.gate, record.threshold, record.max_regenerations) == ("best_effort", 1.0, 1)
    assert [a.seed for a in record.attempts] == [seed, seed + 1] and record.score < 1.0
    assert record.score == max(a.score for a in record.attempts) == record.attempts[record.chosen].score
    assert all(a.answers and 0.0 <= a.answers[0].p_yes <= 1.0 and a.answers[0].question for a in record.attempts)
    assert len(pictures) == 2 and all(_png_size(p) == (32, 32) for p in pictures)
    assert pictures[record.chosen] == png and pictures[0] != pictures[1]

    for twin in (hit, as_dict):  # answered at submission, from the first job's result
        assert (twin.status, twin.dedupe, twin.dedupe_of) == ("succeeded", "hit", first.id)
        assert twin.timings.gpu_seconds == 0 and twin.quality is not None
        assert (twin.quality.gate, twin.quality.score, len(twin.quality.attempts)) == ("best_effort", record.score, 2)
    assert hit_png == png

    assert [(j.dedupe, j.dedupe_of) for j in items] == [("hit", first.id), ("miss", None)]
    own = items[1].quality
    assert items[1].status == "succeeded" and own is not None
    assert (own.gate, own.threshold, own.max_regenerations, [a.seed for a in own.attempts]) == \
        ("passed", 0.0, 0, [seed])


# ---------------------------------------------------------------------------------------------
# Sessions


def test_the_async_client_holds_a_session_whose_turns_see_the_earlier_ones(stack: Stack) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    _, key, _ = _tenant(stack)
    turn = {"seed": 1, "params": {"num_timesteps": STEPS}}

    async def scenario() -> tuple[object, ...]:
        async with AsyncClient(stack.api_url(), key) as client:
            bag = await client.upload(product_image(PRODUCT_PX), filename="bag.png")
            session = await client.create_session(system_prompt="You photograph our bags.",
                                                  parts=[bag, "This is our bag.", {"text": "It is red."}],
                                                  metadata={"shop": "bags"})
            edit = await client.add_turn(session, "edit", "the bag on a beach", idempotency_key="beach", **turn)
            replayed = await client.add_turn(session, "edit", "the bag on a beach", idempotency_key="beach", **turn)
            ask = await client.add_turn(session.id, "understand", "What is on the beach?",
                                        params={"max_new_tokens": 8})
            done = [await client.wait(job, timeout_s=WAIT_S, poll_s=0.05) for job in (edit, ask)]
            png = await client.result_bytes(done[0])
            read = await client.get_session(session)
            await client.delete_session(session)
            with pytest.raises(ApiError) as gone:
                await client.get_session(session.id)
            return bag, session, edit, replayed, ask, done, png, read, gone.value

    bag, session, edit, replayed, ask, (edited, answered), png, read, gone = asyncio.run(scenario())
    assert session.parts == [{"file_id": bag.id}, {"text": "This is our bag."}, {"text": "It is red."}]
    assert session.metadata == {"shop": "bags"} and session.turns == []
    assert 0 < session.context_tokens < session.max_context_tokens
    assert replayed.id == edit.id  # the same Idempotency-Key: the first answer again
    assert (edit.session_id, edit.turn_index, ask.session_id, ask.turn_index) == (session.id, 0, session.id, 1)
    assert edited.status == answered.status == "succeeded" and isinstance(answered.result.text, str)
    assert _png_size(png) == (edited.width, edited.height) == (PRODUCT_PX, PRODUCT_PX)  # the bag's size

    assert read.turns == [Turn(0, edit.id, "edit", "succeeded"), Turn(1, ask.id, "understand", "succeeded")]
    assert [(i.turn, i.role, i.kind) for i in read.transcript] == [
        (None, "system", "text"), (None, "user", "image"), (None, "user", "text"), (None, "user", "text"),
        (0, "user", "text"), (0, "assistant", "image"), (1, "user", "text"), (1, "assistant", "text")]
    assert read.transcript[1].file_id == bag.id and read.transcript[1].url
    assert [i.job_id for i in read.transcript[4:]] == [edit.id, edit.id, ask.id, ask.id]
    assert read.transcript[7].text == answered.result.text and read.context_tokens > session.context_tokens
    assert (gone.status, gone.code, gone.field) == (404, "not_found", "session_id")
    with stack.session() as s:
        assert s.query(ModelSession).count() == 0 and s.query(Job).count() == 0  # its turns went with it


# ---------------------------------------------------------------------------------------------
# The command line and the README


def _submit_cli(stack: Stack, key: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "prompts.txt").write_text("# scenes for the bag\n" + "\n\n".join(SCENES) + "\n")
    script = Path(sys.executable).parent / "bagel-jobs"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]
    env = dict(stack.env, BAGEL_API_URL=stack.api_url(), BAGEL_API_KEY=key)
    return subprocess.run([*command, "submit", "tryon", "--product", str(_product(tmp_path)),
                           "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "results"),
                           "--seed", "1", *extra], capture_output=True, text=True, env=env, timeout=WAIT_S,
                          check=False)


def test_submit_tryon_writes_an_image_per_prompt_and_a_manifest(stack: Stack, tmp_path: Path) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    _, key, _ = _tenant(stack)
    # A threshold every picture reaches: the gate is on (max_regenerations at its default), one attempt each.
    run = _submit_cli(stack, key, tmp_path, "--steps", str(STEPS), "--quality-threshold", "0", "--wait")
    assert run.returncode == 0, run.stderr
    submitted = json.loads(run.stdout.splitlines()[0])
    assert len(submitted["job_ids"]) == len(SCENES)
    assert f"] {len(SCENES)}/{len(SCENES)} jobs" in run.stderr  # the progress bar's last state
    assert f"{len(SCENES)} of {len(SCENES)} succeeded (quality gate: {len(SCENES)} passed, 0 best effort)" in run.stderr
    with Client(stack.api_url(), key) as client:
        assert client.get_job(submitted["job_ids"][0]).params["quality_gate"] == {"threshold": 0.0,
                                                                                 "max_regenerations": 2}

    out = tmp_path / "results"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["batch_id"] == submitted["batch_id"] and manifest["counts"]["succeeded"] == len(SCENES)
    assert [j["job_id"] for j in manifest["jobs"]] == submitted["job_ids"]
    assert [j["prompt"] for j in manifest["jobs"]] == SCENES and [j["seed"] for j in manifest["jobs"]] == [1, 2, 3]
    assert [j["file"] for j in manifest["jobs"]] == ["000.png", "001.png", "002.png"]
    assert [(j["dedupe"], j["dedupe_of"]) for j in manifest["jobs"]] == [("miss", None)] * len(SCENES)  # seeded
    assert [j["quality"] for j in manifest["jobs"]] == [
        {"gate": "passed", "score": j["quality"]["score"], "threshold": 0.0, "attempts": 1, "result_seed": j["seed"]}
        for j in manifest["jobs"]]
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.png", "002.png"]
    for name in ("000.png", "001.png", "002.png"):
        assert _png_size((out / name).read_bytes()) == (PRODUCT_PX, PRODUCT_PX)


def test_submit_tryon_exits_1_when_a_job_does_not_succeed(stack: Stack, tmp_path: Path) -> None:
    stack.start("api")
    stack.start("reconciler")  # its dispatcher expires the jobs; no GPU worker runs them
    _, key, _ = _tenant(stack)
    run = _submit_cli(stack, key, tmp_path, "--deadline-s", "1", "--wait")
    assert run.returncode == 1, run.stderr
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    assert [(j["status"], j["file"]) for j in manifest["jobs"]] == [("expired", None)] * len(SCENES)
    assert "0 of 3 succeeded" in run.stderr

    refused = _submit_cli(stack, key, tmp_path, "--adapter", "no-such-adapter", "--adapter-scale", "0.5")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "422" in refused.stderr and "adapter" in refused.stderr, refused.stderr
    out_of_range = _submit_cli(stack, key, tmp_path, "--max-regenerations", "9")
    assert out_of_range.returncode == 1 and out_of_range.stdout == ""
    assert "422" in out_of_range.stderr and "quality_gate.max_regenerations" in out_of_range.stderr, \
        out_of_range.stderr


def readme_example(readme: str) -> str:
    """The first ``python`` block of README's "Using it from Python" section."""
    _, found, section = readme.partition("### Using it from Python")
    assert found, "README.md has no '### Using it from Python' section"
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no python block in README's 'Using it from Python'"
    return match.group(1)


def test_the_readme_python_example_runs_as_written(stack: Stack, tmp_path: Path) -> None:
    code = readme_example((ROOT / "README.md").read_text())
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    _, key, _ = _tenant(stack)
    _product(tmp_path)
    env = dict(stack.env, BAGEL_API_URL=stack.api_url(), BAGEL_API_KEY=key)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=WAIT_S, check=False)
    assert run.returncode == 0, run.stderr
    written = sorted((tmp_path / "results").glob("*.png"))
    assert [p.name for p in written] == ["0.png", "1.png"]
    assert all(_png_size(p.read_bytes()) == (PRODUCT_PX, PRODUCT_PX) for p in written)
    assert "2/2 jobs" in run.stdout


# README "Using it from Python", sessions: run as written.
SESSION_EXAMPLE = """\
from bagel_client import Client

with Client() as client:  # BAGEL_API_URL and BAGEL_API_KEY from the environment
    bag = client.upload("bag.png")
    session = client.create_session(system_prompt="You photograph our bags.", parts=[bag, "This is our bag."])
    beach = client.add_turn(session, "edit", "the bag on a beach at sunset", seed=1)
    question = client.add_turn(session, "understand", "What colour is the sky?")  # sees the beach picture
    beach, question = client.wait(beach), client.wait(question)
    client.download(beach, "beach.png")
    for item in client.get_session(session).transcript:
        print(item.turn, item.role, item.kind, item.text if item.kind == "text" else item.url)
    client.delete_session(session)
"""


@SQLITE_ONLY
def test_the_readme_session_example_runs_as_written(stack: Stack, tmp_path: Path) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    _, key, _ = _tenant(stack)
    _product(tmp_path)
    env = dict(stack.env, BAGEL_API_URL=stack.api_url(), BAGEL_API_KEY=key)
    assert f"```python\n{SESSION_EXAMPLE}```" in (ROOT / "README.md").read_text()  # the README's, as written
    run = subprocess.run([sys.executable, "-c", SESSION_EXAMPLE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=WAIT_S, check=False)
    assert run.returncode == 0, run.stderr
    assert _png_size((tmp_path / "beach.png").read_bytes()) == (PRODUCT_PX, PRODUCT_PX)
    lines = ["None system text You photograph our bags.", "None user image http", "None user text This is our bag.",
             "0 user text the bag on a beach at sunset", "0 assistant image http", "1 user text What colour is the sky?",
             "1 assistant text "]
    starts = [run.stdout.find("\n" + line) for line in lines[1:]]
    assert run.stdout.startswith(lines[0]) and -1 not in starts and starts == sorted(starts), run.stdout
    with stack.session() as s:
        assert s.query(ModelSession).count() == 0 and s.query(Job).count() == 0
