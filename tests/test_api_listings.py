"""GET /v1/jobs, GET /v1/batches and GET /v1/usage on both stacks: filters, cursor pagination
(newest first, no row repeated or skipped, also among rows created in the same instant),
422s naming the query parameter, tenant isolation, and usage sums per UTC day and task."""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from worker import queries
from worker.models import Batch, Job, JobStatus

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def post_job(stack, key=None, **extra):
    r = stack.client.post("/v1/jobs", json={"task": "generate", "prompt": "a mug", "width": 32, "height": 32,
                                            **extra}, headers=stack.auth(key))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def post_batch(stack, n, key=None):
    r = stack.client.post("/v1/batches", json={"task": "generate", "width": 32, "height": 32,
                                               "items": [{"prompt": f"mug {i}"} for i in range(n)]},
                          headers=stack.auth(key))
    assert r.status_code == 202, r.text
    return r.json()


def set_rows(stack, model, ids, **values):
    with stack.session() as s:
        s.execute(update(model).where(model.id.in_(list(ids))).values(**values))
        s.commit()


def get(stack, path, key=None, **params):
    return stack.client.get(path, params=params, headers=stack.auth(key))


def all_pages(stack, path, limit, **params):
    """Every page of a listing: (ids in order, number of pages)."""
    ids, pages, cursor = [], 0, None
    while True:
        r = get(stack, path, limit=limit, **params, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) <= limit
        ids += [row["id"] for row in body["data"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages
        assert pages < 50, "the cursor does not advance"


@pytest.fixture
def timeline(api_stack):
    """Eleven jobs: two singles after a six-job batch (all six created in one instant, T0),
    three singles before it. Returns (singles newest first, the batch)."""
    newer = [post_job(api_stack) for _ in range(2)]
    batch = post_batch(api_stack, 6)
    older = [post_job(api_stack) for _ in range(3)]
    singles = newer + older
    stamps = [T0 + timedelta(minutes=2), T0 + timedelta(minutes=1),
              T0 - timedelta(minutes=1), T0 - timedelta(minutes=2), T0 - timedelta(minutes=3)]
    for job_id, stamp in zip(singles, stamps, strict=True):
        set_rows(api_stack, Job, [job_id], created_at=stamp)
    set_rows(api_stack, Job, batch["job_ids"], created_at=T0)
    set_rows(api_stack, Batch, [batch["id"]], created_at=T0)
    return singles, batch


def test_job_pages_cover_every_job_once_newest_first(api_stack, timeline):
    singles, batch = timeline
    with api_stack.session() as s:
        expected = [j.id for j in sorted(s.scalars(select(Job)).all(), key=lambda j: (j.created_at, j.id),
                                         reverse=True)]
    assert len(expected) == 11
    assert expected[:2] == singles[:2] and expected[-3:] == singles[2:]
    ids, pages = all_pages(api_stack, "/v1/jobs", limit=4)  # the batch's tie spans two page breaks
    assert ids == expected and pages == 3
    assert all_pages(api_stack, "/v1/jobs", limit=11) == (expected, 1)  # exactly one full page, no empty one
    assert all_pages(api_stack, "/v1/jobs", limit=1) == (expected, 11)
    first = get(api_stack, "/v1/jobs").json()
    assert [j["id"] for j in first["data"]] == expected and first["next_cursor"] is None  # default limit 50
    assert first["data"][0]["status"] == "queued" and first["data"][0]["priority"] == "batch"


def test_job_filters(api_stack, timeline):
    singles, batch = timeline
    for job_id in singles[1:3]:
        assert api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=api_stack.auth()).status_code == 200
    product = api_stack.upload_png()
    asked = post_job(api_stack, task="understand", prompt="What is it?", input_file_ids=[product],
                     width=None, height=None)

    def ids(**params):
        r = get(api_stack, "/v1/jobs", **params)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["data"]]

    assert ids(status="canceled") == singles[1:3]
    assert len(ids(status="queued")) == 10 and not set(ids(status="queued")) & set(singles[1:3])
    assert ids(status="succeeded") == []
    assert ids(task="understand") == [asked]
    assert len(ids(task="generate")) == 11
    assert set(ids(batch_id=batch["id"])) == set(batch["job_ids"]) and len(ids(batch_id=batch["id"])) == 6
    assert ids(batch_id=batch["id"], status="canceled") == []
    # Bounds are exclusive; times without a zone are UTC; any offset is understood.
    assert ids(created_after=T0.isoformat(), created_before=(T0 + timedelta(minutes=2)).isoformat()) == [singles[1]]
    assert ids(created_after="2026-01-10T12:00:00", created_before="2026-01-10T12:02:00") == [singles[1]]
    assert ids(created_after="2026-01-10T13:59:59+02:00", created_before="2026-01-10T14:00:01+02:00") == \
        sorted(batch["job_ids"], reverse=True)
    assert ids(created_before=(T0 - timedelta(minutes=1)).isoformat()) == singles[3:]
    paged, _ = all_pages(api_stack, "/v1/jobs", limit=2, batch_id=batch["id"])
    assert paged == sorted(batch["job_ids"], reverse=True)


@pytest.mark.parametrize(("path", "params", "field", "message"), [
    ("/v1/jobs", {"status": "done"}, "status", "status: Input should be 'queued', 'running'"),
    ("/v1/jobs", {"task": "paint"}, "task", "task: Input should be 'generate', 'edit', 'understand' or 'tryon'"),
    ("/v1/jobs", {"limit": 0}, "limit", "limit: Input should be greater than or equal to 1"),
    ("/v1/jobs", {"limit": 201}, "limit", "limit: Input should be less than or equal to 200 (limit: <= 200)"),
    ("/v1/jobs", {"created_after": "yesterday"}, "created_after", "created_after: Input should be a valid datetime"),
    ("/v1/jobs", {"cursor": "!!not-a-cursor"}, "cursor", "cursor: '!!not-a-cursor' is not a cursor this API returned"),
    ("/v1/jobs", {"cursor": base64.urlsafe_b64encode(b"2026-01-01|x").decode()}, "cursor", "cursor: "),
    ("/v1/jobs", {"cursor": base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|a\x00b").decode()}, "cursor",
     "cursor: "),
    ("/v1/jobs", {"batch_id": "a\x00b"}, "batch_id", "batch_id: contains the control character U+0000 at position 1"),
    ("/v1/batches", {"status": "queued"}, "status", "status: Input should be 'active' or 'completed'"),
    ("/v1/batches", {"limit": 500}, "limit", "limit: Input should be less than or equal to 200"),
    ("/v1/batches", {"created_before": "2026-13-01"}, "created_before", "created_before: Input should be a valid"),
    ("/v1/batches", {"cursor": "bm9wZQ"}, "cursor", "cursor: 'bm9wZQ' is not a cursor this API returned"),
])
def test_bad_listing_parameters_are_422s_naming_the_parameter(api_stack, path, params, field, message):
    r = get(api_stack, path, **params)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["message"].startswith(message), error


def test_listings_show_only_the_callers_rows(api_stack, timeline):
    singles, batch = timeline
    theirs = post_job(api_stack, key=api_stack.other_key)
    their_batch = post_batch(api_stack, 2, key=api_stack.other_key)
    mine = {j["id"] for j in get(api_stack, "/v1/jobs", limit=200).json()["data"]}
    assert len(mine) == 11 and theirs not in mine and not mine & set(their_batch["job_ids"])
    listed = get(api_stack, "/v1/jobs", key=api_stack.other_key).json()["data"]
    assert {j["id"] for j in listed} == {theirs, *their_batch["job_ids"]}
    assert get(api_stack, "/v1/jobs", key=api_stack.other_key, batch_id=batch["id"]).json()["data"] == []
    assert get(api_stack, "/v1/jobs", batch_id=their_batch["id"]).json()["data"] == []
    assert [b["id"] for b in get(api_stack, "/v1/batches").json()["data"]] == [batch["id"]]
    assert [b["id"] for b in get(api_stack, "/v1/batches", key=api_stack.other_key).json()["data"]] == \
        [their_batch["id"]]
    # A cursor taken from one tenant's listing shows the other tenant nothing of the first.
    cursor = get(api_stack, "/v1/jobs", limit=1).json()["next_cursor"]
    after = get(api_stack, "/v1/jobs", key=api_stack.other_key, cursor=cursor).json()["data"]
    assert not {j["id"] for j in after} & mine


def test_batch_listing_filters_by_completion_and_pages(api_stack):
    made = [post_batch(api_stack, 1 + i % 2)["id"] for i in range(5)]
    for i, batch_id in enumerate(made):
        set_rows(api_stack, Batch, [batch_id], created_at=T0 + timedelta(seconds=i))
    set_rows(api_stack, Batch, made[1:3], completed_at=T0 + timedelta(hours=1))
    newest_first = made[::-1]

    def ids(**params):
        r = get(api_stack, "/v1/batches", **params)
        assert r.status_code == 200, r.text
        return [b["id"] for b in r.json()["data"]]

    assert ids() == newest_first
    assert ids(status="completed") == [made[2], made[1]]
    assert ids(status="active") == [made[4], made[3], made[0]]
    assert ids(created_after=T0.isoformat(), created_before=(T0 + timedelta(seconds=4)).isoformat()) == \
        [made[3], made[2], made[1]]
    assert all_pages(api_stack, "/v1/batches", limit=2) == (newest_first, 3)
    assert all_pages(api_stack, "/v1/batches", limit=1, status="active") == ([made[4], made[3], made[0]], 3)
    row = get(api_stack, "/v1/batches", status="completed", limit=1).json()["data"][0]
    assert row["status"] == "completed" and row["job_count"] == 1 and row["counts"]["queued"] == 1
    assert row["priority"] == "batch" and row["deadline_at"] is None and row["job_ids"] is None


# ---------------------------------------------------------------------------------------------
# Usage


def _finish(stack, job_id, status, finished_at, gpu_seconds):
    set_rows(stack, Job, [job_id], status=status, finished_at=finished_at, gpu_seconds=gpu_seconds)


@pytest.fixture
def finished_jobs(api_stack):
    """Jobs finished around 2026-03-01..02, in and out of the range, of both tenants."""
    product = api_stack.upload_png()
    at = datetime.fromisoformat
    rows = [
        (post_job(api_stack), JobStatus.succeeded, at("2026-03-01T10:00:00+00:00"), 1.5),
        (post_job(api_stack), JobStatus.failed, at("2026-03-01T23:59:59+00:00"), 0.5),
        (post_job(api_stack, task="understand", prompt="What?", input_file_ids=[product], width=None, height=None),
         JobStatus.succeeded, at("2026-03-01T12:00:00+00:00"), 0.25),
        (post_job(api_stack, task="tryon", prompt="beach", input_file_ids=[product], width=None, height=None),
         JobStatus.succeeded, at("2026-03-02T00:00:00+00:00"), 2.0),
        (post_job(api_stack), JobStatus.canceled, at("2026-03-02T08:00:00+00:00"), None),
        (post_job(api_stack), JobStatus.succeeded, at("2026-02-28T23:59:59.999999+00:00"), 100.0),  # before
        (post_job(api_stack), JobStatus.succeeded, at("2026-03-03T00:00:00+00:00"), 100.0),  # after
        (post_job(api_stack, key=api_stack.other_key), JobStatus.succeeded, at("2026-03-01T10:00:00+00:00"), 50.0),
    ]
    for job_id, status, finished_at, gpu_seconds in rows:
        _finish(api_stack, job_id, status, finished_at, gpu_seconds)
    post_job(api_stack)  # still queued: never counted
    return rows


EXPECTED_DAYS = [
    {"date": "2026-03-01", "task": "generate", "jobs": 2, "images": 1, "gpu_seconds": 2.0},
    {"date": "2026-03-01", "task": "understand", "jobs": 1, "images": 0, "gpu_seconds": 0.25},
    {"date": "2026-03-02", "task": "generate", "jobs": 1, "images": 0, "gpu_seconds": 0.0},
    {"date": "2026-03-02", "task": "tryon", "jobs": 1, "images": 1, "gpu_seconds": 2.0},
]


def test_usage_sums_finished_jobs_per_utc_day_and_task(api_stack, finished_jobs):
    r = get(api_stack, "/v1/usage", **{"from": "2026-03-01", "to": "2026-03-02"})
    assert r.status_code == 200, r.text
    assert r.json() == {"from": "2026-03-01", "to": "2026-03-02", "days": EXPECTED_DAYS,
                        "totals": {"jobs": 5, "images": 2, "gpu_seconds": 4.25}}
    one_day = get(api_stack, "/v1/usage", **{"from": "2026-03-02", "to": "2026-03-02"}).json()
    assert one_day["days"] == EXPECTED_DAYS[2:] and one_day["totals"] == {"jobs": 2, "images": 1, "gpu_seconds": 2.0}
    theirs = get(api_stack, "/v1/usage", key=api_stack.other_key, **{"from": "2026-03-01", "to": "2026-03-02"}).json()
    assert theirs["totals"] == {"jobs": 1, "images": 1, "gpu_seconds": 50.0}
    wide = get(api_stack, "/v1/usage", **{"from": "2026-02-28", "to": "2026-03-03"}).json()
    assert wide["totals"] == {"jobs": 7, "images": 4, "gpu_seconds": 204.25}


def test_usage_days_are_utc_whatever_the_database_session_zone(api_stack, finished_jobs):
    with api_stack.session() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SET LOCAL TIME ZONE 'Pacific/Kiritimati'"))  # UTC+14: 23:59 UTC is the next day there
        rows = queries.usage(s, api_stack.tenant_id, date(2026, 3, 1), date(2026, 3, 2))
    assert [(r.day.isoformat(), r.task, r.jobs, r.images, r.gpu_seconds) for r in rows] == \
        [tuple(d.values()) for d in EXPECTED_DAYS]


def test_usage_defaults_to_the_current_month(api_stack):
    job_id = post_job(api_stack)
    now = datetime.now(UTC)
    _finish(api_stack, job_id, JobStatus.succeeded, now, 3.0)
    body = get(api_stack, "/v1/usage").json()
    first = now.date().replace(day=1)
    last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    assert (body["from"], body["to"]) == (first.isoformat(), last.isoformat())
    assert body["days"] == [{"date": now.date().isoformat(), "task": "generate", "jobs": 1, "images": 1,
                             "gpu_seconds": 3.0}]


@pytest.mark.parametrize(("params", "status", "field", "message"), [
    ({"from": "2025-01-01", "to": "2026-01-01"}, 200, None, None),  # 366 days: the limit
    ({"from": "2025-01-01", "to": "2026-01-02"}, 422, "to", "to: 2025-01-01..2026-01-02 spans 367 days, over the "
                                                            "366 day limit"),
    ({"from": "2026-03-02", "to": "2026-03-01"}, 422, "to", "to: 2026-03-01 is before from 2026-03-02"),
    ({"from": "2026-13-01"}, 422, "from", "from: Input should be a valid date"),
    ({"to": "soon"}, 422, "to", "to: Input should be a valid date"),
])
def test_usage_range_is_checked(api_stack, params, status, field, message):
    r = get(api_stack, "/v1/usage", **params)
    assert r.status_code == status, r.text
    if status == 422:
        error = r.json()["error"]
        assert error["field"] == field and error["message"].startswith(message), error
    else:
        assert r.json()["days"] == [] and r.json()["totals"] == {"jobs": 0, "images": 0, "gpu_seconds": 0.0}
