"""Batch progress reports and the batch manifest.

- ``batch.progress`` (``worker.progress``) on real PostgreSQL and SQLite, through the lease
  protocol: throttled to one per interval per batch (also when workers finish jobs at once),
  never after ``batch.completed``, each report stamping the jobs it counts final (the
  manifest's ``since``).
- ``GET /v1/batches/{id}/manifest`` on both API stacks while the batch runs: JSON pages, the
  ``since`` cursor, CSV (parsed back with the csv module: quoting, formula neutralising, paging
  of the stream), tenant scoping and bad queries.
- End to end with real processes (reconciler, GPU worker, webhook worker, the real receiver):
  progress events arrive before ``batch.completed``, signed, their counts never going back.
"""

from __future__ import annotations

import csv
import io
import threading
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from svix.webhooks import Webhook as SvixWebhook

from api import manifest
from api.main import create_app
from api.schemas import ManifestEntry
from tests.fixtures.contract import assert_event_matches_contract
from tests.fixtures.worker import Stack, wait_until
from worker import chunks, jobs, queries, tenants
from worker.db import session_factory
from worker.jobs import JobSpec
from worker.models import Batch, Job, WebhookDelivery, utcnow
from worker.dev.receiver import WebhookReceiver

HOOK = "http://127.0.0.1:9/hook"
HOUR_S = 3600.0
TINY_S = 0.001
PROMPTS = ["plain scene", 'a mug, a plate and "a spoon"\non two lines', '=HYPERLINK("http://x.example","click")',
           "+1 and -1 @home", "@SUM(A1:A2)"]


def spec(i: int) -> JobSpec:
    return JobSpec(task="generate", prompt=f"scene {i}", params={"num_timesteps": 2, "seed": i}, width=32, height=32)


def start_batch(session: Session, tenant_id: str, n: int, interval_s: float | None,
                webhook_url: str | None = HOOK) -> tuple[str, list[str]]:
    """A batch of ``n`` jobs, all claimed by worker w1 (one chunk, as the dispatcher forms it)."""
    batch, rows = jobs.submit(session, tenant_id, [spec(i) for i in range(n)], batch=True, webhook_url=webhook_url,
                              metadata={"sku": "X1"}, progress_interval_s=interval_s)
    assert batch is not None
    chunk_id = chunks.form_chunk(session, [j.id for j in rows], utcnow())
    session.commit()
    assert len(chunks.claim_chunk(session, chunk_id, "w1", lease_s=60)) == n
    return batch.id, [j.id for j in rows]


def finish(session: Session, job_id: str, worker: str = "w1") -> None:
    assert jobs.complete_job(session, job_id, worker, output_key=f"results/{job_id}.png", model_seconds=0.1)


def events(session: Session) -> list[WebhookDelivery]:
    rows = list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)
                                .execution_options(populate_existing=True)).all())
    session.commit()
    return rows


def progress_data(session: Session) -> list[dict[str, Any]]:
    return [d.payload["data"] for d in events(session) if d.event == "batch.progress"]


def batch_row(session: Session, batch_id: str) -> Batch:
    row = session.get(Batch, batch_id, populate_existing=True)
    session.commit()
    assert row is not None
    return row


def report_seqs(session: Session, job_ids: list[str]) -> list[int | None]:
    return [j.report_seq for j in queries.load_jobs(session, job_ids)]


def wait_past_interval(session: Session, batch_id: str) -> None:
    """Until the batch's last report is older than its interval (a condition, not a sleep)."""
    batch = batch_row(session, batch_id)
    assert batch.reported_at is not None and batch.progress_interval_s is not None
    due = batch.reported_at + timedelta(seconds=batch.progress_interval_s)
    wait_until(lambda: utcnow() >= due, 10, 0.001, what="the progress interval to pass")


def test_two_finishes_within_the_interval_write_one_progress_event(db_session, db_kind):
    tenant_id = tenants.create_tenant(db_session, "acme").id
    batch_id, ids = start_batch(db_session, tenant_id, 4, HOUR_S)
    finish(db_session, ids[0])
    assert jobs.fail_job(db_session, ids[1], "w1", "invalid_input", "prompt: bad")
    [data] = progress_data(db_session)
    assert data == {"batch_id": batch_id, "seq": 1, "since": 0, "done": 1, "total": 4, "newly_done": 1,
                    "counts": {"queued": 0, "running": 3, "succeeded": 1, "failed": 0, "canceled": 0, "expired": 0},
                    "manifest_path": f"/v1/batches/{batch_id}/manifest?since=0", "metadata": {"sku": "X1"}}
    assert [d.event for d in events(db_session)] == ["job.succeeded", "batch.progress", "job.failed"]
    assert report_seqs(db_session, ids) == [1, None, None, None]  # the failure is not reported yet
    batch = batch_row(db_session, batch_id)
    assert batch.report_seq == 1 and batch.reported_at is not None and batch.completed_at is None


def test_a_finish_after_the_interval_writes_the_next_report_with_only_the_new_jobs(db_session, db_kind):
    tenant_id = tenants.create_tenant(db_session, "acme").id
    batch_id, ids = start_batch(db_session, tenant_id, 5, 0.05)
    finish(db_session, ids[0])
    finish(db_session, ids[1])  # reported or not, depending on the machine's speed: the checks allow both
    wait_past_interval(db_session, batch_id)
    assert jobs.fail_job(db_session, ids[2], "w1", "invalid_input", "prompt: bad")
    reports = progress_data(db_session)
    assert [r["seq"] for r in reports] == list(range(1, len(reports) + 1)) and len(reports) >= 2
    last = reports[-1]
    assert last["since"] == last["seq"] - 1 and last["manifest_path"].endswith(f"?since={last['seq'] - 1}")
    assert last["done"] == 3 and last["counts"]["failed"] == 1 and last["counts"]["succeeded"] == 2
    assert [r["done"] for r in reports] == sorted(r["done"] for r in reports)
    assert sum(r["newly_done"] for r in reports) == 3  # each finished job counted by exactly one report
    seqs = report_seqs(db_session, ids)
    assert seqs[2] == last["seq"] and seqs[3:] == [None, None] and None not in seqs[:3]


def test_the_last_finish_completes_the_batch_and_no_progress_follows(db_session, db_kind):
    tenant_id = tenants.create_tenant(db_session, "acme").id
    batch_id, ids = start_batch(db_session, tenant_id, 3, TINY_S)
    finish(db_session, ids[0])
    wait_past_interval(db_session, batch_id)
    jobs.cancel_job(db_session, tenant_id, ids[1])  # running: cancel requested, nothing final yet
    assert jobs.mark_canceled(db_session, ids[1], "w1")  # a cancel finishes a job too: a report
    wait_past_interval(db_session, batch_id)
    finish(db_session, ids[2])  # the last one: batch.completed, not a progress event, though one is due
    jobs.cancel_batch(db_session, tenant_id, batch_id)
    assert [d.event for d in events(db_session)] == ["job.succeeded", "batch.progress", "batch.progress",
                                                     "job.succeeded", "batch.completed"]
    assert [r["counts"]["canceled"] for r in progress_data(db_session)] == [0, 1]
    assert report_seqs(db_session, ids) == [1, 2, 3]  # the completion is the last report
    batch = batch_row(db_session, batch_id)
    assert batch.report_seq == 3 and batch.completed_at is not None


def test_a_batch_without_an_interval_reports_only_its_completion(db_session, db_kind):
    tenant_id = tenants.create_tenant(db_session, "acme").id
    batch_id, ids = start_batch(db_session, tenant_id, 2, None)
    finish(db_session, ids[0])
    assert report_seqs(db_session, ids) == [None, None]
    finish(db_session, ids[1])
    assert [d.event for d in events(db_session)] == ["job.succeeded", "job.succeeded", "batch.completed"]
    assert report_seqs(db_session, ids) == [1, 1] and batch_row(db_session, batch_id).report_seq == 1


def test_a_batch_without_a_webhook_still_numbers_its_reports(db_session, db_kind):
    tenant_id = tenants.create_tenant(db_session, "acme").id
    batch_id, ids = start_batch(db_session, tenant_id, 2, HOUR_S, webhook_url=None)
    finish(db_session, ids[0])
    assert events(db_session) == [] and report_seqs(db_session, ids) == [1, None]  # for pollers' ?since=


def test_concurrent_finishes_write_one_progress_event(db_session, db_kind):
    tenant_id = tenants.create_tenant(db_session, "acme").id
    factory = session_factory(db_session.get_bind())
    for round_ in range(3):
        batch_id, ids = start_batch(db_session, tenant_id, 6, HOUR_S)
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def run(job_id: str) -> None:
            try:
                with factory() as s:
                    barrier.wait()
                    finish(s, job_id)
            except BaseException as exc:  # noqa: BLE001 — reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(job_id,)) for job_id in ids[:4]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        mine = [d for d in progress_data(db_session) if d["batch_id"] == batch_id]
        assert len(mine) == 1, f"round {round_}: {mine}"
        seqs = report_seqs(db_session, ids)
        assert seqs.count(1) == mine[0]["newly_done"] >= 1 and set(seqs) <= {1, None}
        assert batch_row(db_session, batch_id).report_seq == 1


# ---------------------------------------------------------------------------------------------
# GET /v1/batches/{id}/manifest


def _submit_over_api(api_stack) -> tuple[str, list[str]]:
    r = api_stack.client.post("/v1/batches", headers=api_stack.auth(), json={
        "task": "generate", "width": 32, "height": 32, "params": {"num_timesteps": 2}, "webhook_url": HOOK,
        "metadata": {"campaign": "spring"}, "items": [{"prompt": p, "seed": i} for i, p in enumerate(PROMPTS)]})
    assert r.status_code == 202, r.text
    return r.json()["id"], r.json()["job_ids"]


def _mid_batch(api_stack) -> tuple[str, list[str]]:
    """Five jobs: 0 succeeded (reported at once: the first finish), 1 running, 2 failed (within
    the 30 s default interval: not reported yet), 3 and 4 waiting."""
    batch_id, ids = _submit_over_api(api_stack)
    with api_stack.session() as s:
        chunk_id = chunks.form_chunk(s, ids[:3], utcnow())
        s.commit()
        chunks.claim_chunk(s, chunk_id, "w1", lease_s=60)
        assert jobs.complete_job(s, ids[0], "w1", output_key=f"results/{api_stack.tenant_id}/{ids[0]}.png",
                                 model_seconds=0.1)
        assert jobs.fail_job(s, ids[2], "w1", "invalid_input", "prompt: bad")
    return batch_id, ids


def _manifest(api_stack, batch_id: str, key: str | None = None, headers: dict[str, str] | None = None,
              **params: Any) -> Any:
    return api_stack.client.get(f"/v1/batches/{batch_id}/manifest", params=params,
                                headers={**api_stack.auth(key), **(headers or {})})


def test_the_manifest_is_valid_mid_batch_in_json_pages(api_stack):
    batch_id, ids = _mid_batch(api_stack)
    pages, cursor = [], None
    while True:
        r = _manifest(api_stack, batch_id, limit=2, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        pages.append(r.json())
        cursor = pages[-1]["next_cursor"]
        if cursor is None:
            break
    assert [len(p["jobs"]) for p in pages] == [2, 2, 1] and [p["next_cursor"] for p in pages] == ["2", "4", None]
    first = pages[0]
    assert first["batch_id"] == batch_id and first["status"] == "active" and first["completed_at"] is None
    assert first["counts"] == {"queued": 2, "running": 1, "succeeded": 1, "failed": 1, "canceled": 0, "expired": 0}
    assert (first["done"], first["total"], first["seq"], first["metadata"]) == (2, 5, 1, {"campaign": "spring"})
    entries = [e for p in pages for e in p["jobs"]]
    assert [e["job_id"] for e in entries] == ids and [e["position"] for e in entries] == [0, 1, 2, 3, 4]
    assert [e["status"] for e in entries] == ["succeeded", "running", "failed", "queued", "queued"]
    assert [e["prompt"] for e in entries] == PROMPTS  # JSON is never altered
    done, running, failed, waiting = entries[0], entries[1], entries[2], entries[3]
    assert done["output_url"].startswith("http") and done["output_url_expires_at"] and done["output_key"]
    assert done["seq"] == 1 and done["finished_at"] and done["model_seconds"] == 0.1 and done["error_code"] is None
    assert running["started_at"] and running["finished_at"] is None and running["output_url"] is None
    assert (failed["error_code"], failed["error_message"], failed["seq"]) == ("invalid_input", "prompt: bad", None)
    assert waiting["started_at"] is None and waiting["seq"] is None and waiting["think"] is False
    assert list(entries[0]) == list(ManifestEntry.model_fields)

    # The cursor of reports: since=0 lists what report 1 counted; nothing is reported after it yet.
    assert [e["job_id"] for e in _manifest(api_stack, batch_id, since=0).json()["jobs"]] == [ids[0]]
    assert _manifest(api_stack, batch_id, since=1).json()["jobs"] == []


def _parse_csv(text: str) -> list[dict[str, str]]:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == list(ManifestEntry.model_fields)  # one header row
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def test_the_manifest_as_csv_quotes_prompts_and_neutralises_formulas(api_stack):
    batch_id, ids = _mid_batch(api_stack)
    by_accept = _manifest(api_stack, batch_id, headers={"Accept": "text/csv"})
    by_query = _manifest(api_stack, batch_id, format="csv")
    for r in (by_accept, by_query):
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/csv")
        assert batch_id in r.headers["content-disposition"]
    rows = _parse_csv(by_accept.text)
    assert [r["job_id"] for r in rows] == ids and [r["job_id"] for r in _parse_csv(by_query.text)] == ids
    assert [r["prompt"] for r in rows] == [PROMPTS[0], PROMPTS[1], "'" + PROMPTS[2], "'" + PROMPTS[3],
                                           "'" + PROMPTS[4]]
    assert [r["status"] for r in rows] == ["succeeded", "running", "failed", "queued", "queued"]
    assert rows[0]["output_url"].startswith("http") and rows[0]["seq"] == "1" and rows[0]["think"] == "false"
    assert rows[1]["output_url"] == "" and rows[1]["finished_at"] == "" and rows[2]["error_code"] == "invalid_input"
    assert [r["job_id"] for r in _parse_csv(_manifest(api_stack, batch_id, format="csv", since=0).text)] == [ids[0]]

    # ?format= decides over Accept; Accept prefers JSON when it rates it higher.
    assert _manifest(api_stack, batch_id, headers={"Accept": "text/csv"}, format="json").json()["total"] == 5
    assert _manifest(api_stack, batch_id, headers={"Accept": "application/json, text/csv;q=0.5"}).json()["seq"] == 1

    # The stream pages through the batch in short transactions: the same rows, a page at a time.
    app = api_stack.client.app
    chunks_ = list(manifest.csv_chunks(app.state.sessions, batch_id, app.state.store, api_stack.settings,
                                       since=None, page_rows=2))
    assert len(chunks_) == 4  # the header, then pages of 2, 2 and 1 rows
    paged = _parse_csv("".join(chunks_))
    assert [{k: v for k, v in r.items() if not k.startswith("output_url")} for r in paged] == [
        {k: v for k, v in r.items() if not k.startswith("output_url")} for r in rows]


def test_the_manifest_is_tenant_scoped_and_bad_queries_are_422s_naming_the_parameter(api_stack):
    batch_id, _ = _submit_over_api(api_stack)
    for params in ({}, {"format": "csv"}):
        r = _manifest(api_stack, batch_id, key=api_stack.other_key, **params)
        assert r.status_code == 404 and r.json()["error"]["field"] == "batch_id", r.text
    assert _manifest(api_stack, "nope").status_code == 404
    for params, field in [({"cursor": "x1"}, "cursor"), ({"cursor": "-1"}, "cursor"), ({"limit": 0}, "limit"),
                          ({"limit": 1001}, "limit"), ({"since": -1}, "since"), ({"format": "xml"}, "format")]:
        r = _manifest(api_stack, batch_id, **params)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    assert api_stack.client.get(f"/v1/batches/{batch_id}/manifest").status_code == 401


# ---------------------------------------------------------------------------------------------
# End to end


def test_progress_events_reach_the_receiver_signed_before_batch_completed(stack: Stack,
                                                                         receiver: WebhookReceiver) -> None:
    settings = stack.settings.model_copy(update={"batch_progress_interval_s": 0.5})
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "acme")
        _, key = tenants.create_api_key(s, tenant.id, "tests")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/batches", headers=auth, json={
            "task": "generate", "width": 32, "height": 32, "params": {"num_timesteps": 2}, "webhook_url": receiver.url,
            "items": [{"prompt": f"a red mug, scene {i}", "seed": i} for i in range(8)]})
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        for role in ("reconciler", "gpu", "webhooks"):
            stack.start(role)
        receiver.wait_for("batch.completed", timeout_s=180)
        batch_events = [item for item in receiver.accepted() if item.event in ("batch.progress", "batch.completed")]
        for item in receiver.accepted():
            SvixWebhook(tenant.webhook_secret).verify(item.body, item.headers)  # raises on a bad signature
            assert_event_matches_contract(item.json())
        assert len({item.headers["webhook-id"] for item in receiver.accepted()}) == len(receiver.accepted())
        kinds = [item.event for item in batch_events]
        assert kinds[-1] == "batch.completed" and kinds.count("batch.completed") == 1
        assert "batch.progress" in kinds[:-1], kinds
        reports = [item.json()["data"] for item in batch_events[:-1]]
        assert all(d["batch_id"] == batch_id and d["total"] == 8 and sum(d["counts"].values()) == 8 for d in reports)
        assert [d["seq"] for d in reports] == list(range(1, len(reports) + 1))
        for before, after in zip(reports, reports[1:], strict=False):
            assert after["done"] >= before["done"]
            assert all(after["counts"][s] >= before["counts"][s] for s in ("succeeded", "failed", "canceled"))
        assert all(0 < d["done"] < 8 for d in reports)

        # The last report's manifest path lists what it counted (and the rest, reported at completion).
        last = reports[-1]
        listed = client.get(last["manifest_path"], headers=auth).json()
        assert listed["status"] == "completed" and listed["seq"] == len(reports) + 1
        assert len(listed["jobs"]) == 8 - sum(d["newly_done"] for d in reports[:-1])
        full = client.get(f"/v1/batches/{batch_id}/manifest", headers=auth).json()
        assert [e["status"] for e in full["jobs"]] == ["succeeded"] * 8
        assert all(e["output_url"] and e["seq"] for e in full["jobs"])
        completed = batch_events[-1].json()["data"]
        assert [j["job_id"] for j in completed["jobs"]] == [e["job_id"] for e in full["jobs"]]
    with stack.session() as s:
        assert s.scalar(select(Batch.report_seq).where(Batch.id == batch_id)) == len(reports) + 1
        assert None not in s.scalars(select(Job.report_seq).where(Job.batch_id == batch_id)).all()
