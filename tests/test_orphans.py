"""No object without its row, on both stacks (SQLite + local folder, Postgres + S3).

A real API process killed between an upload's object write and its commit (the
``pause_after_object_write`` fault holds the request there) leaves an object that no file row
names; a real reconciler process sweeps it while a normally uploaded file and a succeeded job's
result stay. Single sweeps (``sweep_orphans``, real database and storage) keep what rows hold,
what a queued or running job may still record and every object within the grace period, delete
the rest once (a second sweep finds nothing), and put back an input whose row an upload of the
same bytes commits while it is swept. A sweep that cannot reach storage is one counted error of
its reconciler pass. Each test has its own storage folder or S3 prefix.
"""

from __future__ import annotations

import hashlib
import io
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import func, select

from tests.fixtures.worker import Stack, submit_jobs, wait_until
from worker import chunks, jobs, tenants
from worker.faults import Fault, parse_fault
from worker.models import Adapter, File, utcnow
from worker.orphans import SweepReport, sweep_orphans
from worker.reconciler import reconcile_once
from worker.storage import ResultStore, adapter_keys, input_key, make_store, output_key

PAUSE_FAULT = "pause_after_object_write:600"  # far longer than the test: the API dies in the pause


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (shade, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _own_storage(stack: Stack, tmp_path: Path) -> tuple[dict[str, str], Any]:
    """An empty storage folder / S3 prefix for this test: the environment that points processes
    at it, and settings for the test's own store."""
    changes = {"storage_dir": tmp_path / "storage", "s3_prefix": f"orphans-{uuid.uuid4().hex[:10]}/"}
    env = {"BAGEL_JOBS_STORAGE_DIR": str(changes["storage_dir"]), "BAGEL_JOBS_S3_PREFIX": changes["s3_prefix"]}
    return env, stack.settings.model_copy(update=changes)


def _tenant(stack: Stack) -> str:
    with stack.session() as s:
        return tenants.create_tenant(s, f"tenant-{uuid.uuid4().hex[:8]}").id


def _stored_file(stack: Stack, store: ResultStore, tenant_id: str, data: bytes) -> str:
    """An uploaded file as the API leaves it: the object and its row."""
    key = input_key(tenant_id, _sha(data))
    store.put(key, data, "image/png")
    with stack.session() as s:
        jobs.add_file(s, tenant_id, sha256=_sha(data), storage_key=key, content_type="image/png", fmt="PNG",
                      width=24, height=24, size_bytes=len(data), filename="p.png")
    return key


def _file_rows(stack: Stack, key: str) -> int:
    with stack.session() as s:
        return s.scalar(select(func.count()).select_from(File).where(File.storage_key == key))


def test_the_pause_fault_parses_and_malformed_values_are_refused() -> None:
    assert parse_fault(PAUSE_FAULT) == Fault("pause_after_object_write", pause_s=600.0)
    assert parse_fault("pause_after_object_write:0.5").describe() == "pause_after_object_write:0.5"
    refused = {
        "pause_after_object_write": "needs a pause",
        "pause_after_object_write:soon": "the pause 'soon' is not a number of seconds > 0",
        "pause_after_object_write:0": "the pause '0' is not a number of seconds > 0",
        "pause_after_object_write:inf": "the pause 'inf' is not a number of seconds > 0",
    }
    for value, message in refused.items():
        with pytest.raises(ValueError, match=message):
            parse_fault(value)


def test_an_upload_killed_before_its_commit_leaves_an_orphan_that_the_reconciler_sweeps(
        stack: Stack, tmp_path: Path) -> None:
    env, settings = _own_storage(stack, tmp_path)
    store = make_store(settings)
    tenant_id = _tenant(stack)
    with stack.session() as s:
        _, api_key = tenants.create_api_key(s, tenant_id)
    crashed = _png(1)
    crashed_key = input_key(tenant_id, _sha(crashed))
    api = stack.start("api", extra_env={**env, "BAGEL_JOBS_FAULT_INJECTION": PAUSE_FAULT,
                                        "BAGEL_JOBS_API_WORKERS": "1"})
    outcome: list[Any] = []

    def upload() -> None:  # answered only if the API survives the pause, which it does not
        try:
            outcome.append(httpx.post(f"{stack.api_url()}/v1/files", headers={"Authorization": f"Bearer {api_key}"},
                                      files={"file": ("crashed.png", crashed, "image/png")}, timeout=120))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    request = threading.Thread(target=upload, daemon=True)
    request.start()
    api.wait_log(f"fault injection: {crashed_key} stored, pausing")
    wait_until(lambda: store.exists(crashed_key), 30, 0.05, "the upload's object in storage")
    api.kill()
    request.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError), outcome  # no answer came
    assert store.exists(crashed_key) and _file_rows(stack, crashed_key) == 0  # an object without its row

    stack.start("api", extra_env=env)  # the API again, without the fault: a normal upload
    kept = _png(2)
    answer = httpx.post(f"{stack.api_url()}/v1/files", headers={"Authorization": f"Bearer {api_key}"},
                        files={"file": ("kept.png", kept, "image/png")}, timeout=60)
    assert answer.status_code == 201, answer.text
    kept_key = input_key(tenant_id, _sha(kept))
    assert store.exists(kept_key) and _file_rows(stack, kept_key) == 1
    [job_id] = submit_jobs(stack, 1, tenant_id=tenant_id).job_ids  # a succeeded job and its result
    result_key = output_key(tenant_id, job_id)
    store.put(result_key, b"png bytes", "image/png")
    with stack.session() as s:
        chunk_id = chunks.form_chunk(s, [job_id], utcnow())
        s.commit()
        chunks.claim_chunk(s, chunk_id, "w", 60)
        assert jobs.complete_job(s, job_id, "w", output_key=result_key, model_seconds=0.1)

    reconciler = stack.start("reconciler", extra_env={**env, "BAGEL_JOBS_ORPHAN_GRACE_S": "0",
                                                      "BAGEL_JOBS_ORPHAN_SWEEP_INTERVAL_S": "0.5"})
    wait_until(lambda: not store.exists(crashed_key), 60, 0.1, "the orphan to be swept")
    # the sweep that deleted it judged the whole listing: the file and the result stayed
    reconciler.wait_log("orphan sweep: deleted 1 input(s), 0 result(s) and 0 adapter file(s) that no row holds")
    assert sorted(o.key for o in store.list_objects("")) == sorted([kept_key, result_key])


def test_a_sweep_deletes_only_old_objects_that_no_row_holds(stack: Stack, tmp_path: Path) -> None:
    _, settings = _own_storage(stack, tmp_path)
    store = make_store(settings)
    tenant_id = _tenant(stack)
    named = _stored_file(stack, store, tenant_id, _png(3))
    orphan_input = input_key(tenant_id, _sha(b"never recorded"))
    stray = "inputs/stray-object"  # outside the key layout: not ours to judge
    sub = submit_jobs(stack, 5, tenant_id=tenant_id)
    succeeded, running, failed, expired, queued = sub.job_ids
    with stack.session() as s:
        chunk_id = chunks.form_chunk(s, [succeeded, running, failed, expired], utcnow())
        s.commit()
        chunks.claim_chunk(s, chunk_id, "w", 600)
        jobs.complete_job(s, succeeded, "w", output_key=output_key(tenant_id, succeeded), model_seconds=0.1)
        jobs.complete_job(s, expired, "w", output_key=output_key(tenant_id, expired), model_seconds=0.1)
        jobs.mark_result_expired(s, expired)
        jobs.fail_job(s, failed, "w", "invalid_input", "uploaded, then failed")
    with stack.session() as s:  # an adapter's two files, named by its row
        s.add(Adapter(tenant_id=tenant_id, name="kept", sha256=_sha(b"adapter"), config_key="", weights_key="",
                      rank=4, alpha=8.0, target_modules=["q_proj"], size_bytes=7, created_at=utcnow()))
        s.commit()
    held = [named, stray, output_key(tenant_id, succeeded), output_key(tenant_id, running),
            output_key(tenant_id, queued), output_key(tenant_id, queued, "txt"),
            *adapter_keys(tenant_id, _sha(b"adapter"))]
    orphans = [orphan_input, output_key(tenant_id, succeeded, "txt"), output_key(tenant_id, failed),
               output_key(tenant_id, expired), output_key(tenant_id, str(uuid.uuid4())),
               *adapter_keys(tenant_id, _sha(b"an upload that died before its commit"))]
    for key in held[1:] + orphans:
        store.put(key, b"bytes", "application/octet-stream")

    young = sweep_orphans(stack.session, store, grace_s=3600)
    assert young == SweepReport(young=len(held + orphans))
    assert all(store.exists(key) for key in held + orphans)

    report = sweep_orphans(stack.session, store, grace_s=0)
    assert report == SweepReport(inputs=1, results=4, adapters=2)
    assert sorted(o.key for o in store.list_objects("")) == sorted(held)
    assert sweep_orphans(stack.session, store, grace_s=0) == SweepReport()  # a second reconciler: nothing left


def test_an_input_whose_row_is_committed_while_it_is_swept_is_put_back(stack: Stack, tmp_path: Path) -> None:
    _, settings = _own_storage(stack, tmp_path)
    store = make_store(settings)
    tenant_id = _tenant(stack)
    data = _png(4)
    key = input_key(tenant_id, _sha(data))
    store.put(key, data, "image/png")  # an upload of these bytes wrote the object ...
    committed: list[str] = []

    def racing_session() -> Any:  # ... and commits its row the moment the sweep has deleted it
        if not committed and not store.exists(key):
            with stack.session() as s:
                committed.append(jobs.add_file(s, tenant_id, sha256=_sha(data), storage_key=key,
                                               content_type="image/png", fmt="PNG", width=24, height=24,
                                               size_bytes=len(data), filename=None).id)
        return stack.session()

    report = sweep_orphans(racing_session, store, grace_s=0)
    assert committed and report == SweepReport(restored=1)
    assert store.get(key) == data and _file_rows(stack, key) == 1


def test_a_sweep_that_cannot_reach_storage_is_a_counted_error_of_the_pass(stack: Stack, caplog) -> None:
    unreachable = make_store(stack.settings.model_copy(update={
        "storage_backend": "s3", "s3_endpoint_url": "http://127.0.0.1:9", "s3_bucket": "gone",
        "s3_access_key_id": "k", "s3_secret_access_key": SecretStr("s")}))
    report = reconcile_once(stack.settings, stack.session, unreachable, sweep=True)
    assert (report.orphans, report.errors) == (0, 1)
    assert "orphan sweep stopped, the next one tries again: s3: list 'inputs/'" in caplog.text
    assert reconcile_once(stack.settings, stack.session, unreachable).errors == 0  # no sweep asked: no error
