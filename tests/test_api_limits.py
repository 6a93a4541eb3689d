"""Submission controls on both stacks: priority and deadline (body ``deadline_s``, the
``Cancel-After`` header) reach the rows and the JSON, and the tenant's limits —
requests per minute, waiting jobs, monthly GPU-seconds — refuse a submission at the edge with
the service's JSON error (429 + Retry-After, or 403) and store nothing."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError

from worker import limits, tenants
from worker.limits import month_bounds
from worker.models import Batch, Job, JobStatus, Tenant, utcnow


def job_body(**extra):
    return {"task": "generate", "prompt": "a mug", "width": 32, "height": 32, **extra}


def batch_body(n=2, **extra):
    return {"task": "generate", "width": 32, "height": 32, "items": [{"prompt": f"mug {i}"} for i in range(n)],
            **extra}


def post_job(stack, body=None, key=None, headers=None):
    return stack.client.post("/v1/jobs", json=body or job_body(), headers={**stack.auth(key), **(headers or {})})


def post_batch(stack, body=None, key=None, headers=None):
    return stack.client.post("/v1/batches", json=body or batch_body(),
                             headers={**stack.auth(key), **(headers or {})})


def set_limits(stack, **changes):
    with stack.session() as s:
        tenants.set_limits(s, stack.tenant_id, changes)


def set_rows(stack, model, ids, **values):
    with stack.session() as s:
        s.execute(update(model).where(model.id.in_(ids)).values(**values))
        s.commit()


def assert_refused(stack, response, status, code, before, message_parts):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for part in message_parts:
        assert part in error["message"], error["message"]
    assert stack.row_counts() == before  # nothing stored
    return error


def seconds_from_now(stamp: str) -> float:
    return (datetime.fromisoformat(stamp) - utcnow()).total_seconds()


# ---------------------------------------------------------------------------------------------
# Priority and deadline


def test_priority_and_deadline_reach_the_job_row_and_json(api_stack):
    plain = post_job(api_stack).json()
    assert plain["priority"] == "batch" and plain["deadline_at"] is None
    r = post_job(api_stack, job_body(priority="interactive", deadline_s=120))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["priority"] == "interactive"
    assert 118 < seconds_from_now(job["deadline_at"]) <= 120
    with api_stack.session() as s:
        row = s.get(Job, job["id"])
        assert row.priority == "interactive" and row.chunk_id is None
        assert abs((row.deadline_at - datetime.fromisoformat(job["deadline_at"])).total_seconds()) < 1e-3
    got = api_stack.client.get(f"/v1/jobs/{job['id']}", headers=api_stack.auth()).json()
    assert got["priority"] == "interactive" and got["deadline_at"] == job["deadline_at"]


@pytest.mark.parametrize(("header", "deadline_s", "expected_s"), [
    ("5m", None, 300), ("90s", None, 90), ("1h", None, 3600), ("45", None, 45), ("1h30m", None, 5400),
    ("5m", 600, 300),  # both given: the smaller
    ("1h", 60, 60),
])
def test_cancel_after_header_sets_the_deadline_and_the_smaller_wins(api_stack, header, deadline_s, expected_s):
    body = job_body() if deadline_s is None else job_body(deadline_s=deadline_s)
    r = post_job(api_stack, body, headers={"Cancel-After": header})
    assert r.status_code == 202, r.text
    assert expected_s - 2 < seconds_from_now(r.json()["deadline_at"]) <= expected_s


def test_batch_priority_and_deadline_apply_to_the_batch_and_every_job(api_stack):
    r = post_batch(api_stack, batch_body(3, priority="interactive"), headers={"Cancel-After": "90s"})
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["priority"] == "interactive" and 88 < seconds_from_now(batch["deadline_at"]) <= 90
    with api_stack.session() as s:
        row = s.get(Batch, batch["id"])
        assert row.priority == "interactive" and row.deadline_at is not None
        rows = s.scalars(select(Job).where(Job.batch_id == batch["id"])).all()
    assert len(rows) == 3
    assert {(j.priority, j.deadline_at) for j in rows} == {("interactive", row.deadline_at)}
    listed = api_stack.client.get(f"/v1/batches/{batch['id']}/jobs", headers=api_stack.auth()).json()
    assert {j["priority"] for j in listed["items"]} == {"interactive"}


@pytest.mark.parametrize(("path", "body", "headers", "field", "message"), [
    ("/v1/jobs", job_body(deadline_s=0), {}, "deadline_s",
     "deadline_s: Input should be greater than or equal to 1 (limit: >= 1)"),
    ("/v1/jobs", job_body(deadline_s=30 * 86400 + 1), {}, "deadline_s",
     "deadline_s: Input should be less than or equal to 2592000 (limit: <= 2592000)"),
    ("/v1/jobs", job_body(priority="urgent"), {}, "priority", "priority: Input should be 'interactive' or 'batch'"),
    ("/v1/jobs", job_body(), {"Cancel-After": "soon"}, "header.Cancel-After",
     "header.Cancel-After: 'soon' is not a duration like 90s, 5m, 1h or plain seconds"),
    ("/v1/jobs", job_body(), {"Cancel-After": "31d"}, "header.Cancel-After",
     "header.Cancel-After: '31d' is 2678400 s, outside 1..2592000 s (30 days)"),
    ("/v1/jobs", job_body(deadline_s=60), {"Cancel-After": "0"}, "header.Cancel-After",
     "header.Cancel-After: '0' is 0 s, outside 1..2592000 s"),
    ("/v1/batches", batch_body(deadline_s=-5), {}, "deadline_s", "deadline_s: Input should be greater than or equal"),
    ("/v1/batches", batch_body(), {"Cancel-After": "1.5h"}, "header.Cancel-After", "header.Cancel-After: '1.5h'"),
])
def test_bad_priority_or_deadline_is_a_422_naming_the_field_and_nothing_is_stored(api_stack, path, body, headers,
                                                                                  field, message):
    before = api_stack.row_counts()
    r = api_stack.client.post(path, json=body, headers={**api_stack.auth(), **headers})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["message"].startswith(message), error
    assert api_stack.row_counts() == before


def test_idempotency_key_is_bound_to_the_cancel_after_header(api_stack):
    key = {"Idempotency-Key": "deadline-1"}
    first = post_job(api_stack, headers={**key, "Cancel-After": "5m"})
    again = post_job(api_stack, headers={**key, "Cancel-After": "5m"})
    assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]
    other = post_job(api_stack, headers={**key, "Cancel-After": "10m"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"


# ---------------------------------------------------------------------------------------------
# Limits


def test_requests_per_minute_counts_single_jobs_and_batches_and_refuses_one_over(api_stack):
    set_limits(api_stack, requests_per_minute=3)
    first = post_job(api_stack)
    assert first.status_code == 202
    assert post_batch(api_stack, batch_body(4)).status_code == 202  # a batch is one submission
    assert post_job(api_stack).status_code == 202  # the third: exactly at the limit passes
    before = api_stack.row_counts()
    r = post_job(api_stack)
    assert_refused(api_stack, r, 429, "rate_limited", before,
                   ["requests_per_minute: 3 submissions in the last 60 s reach the tenant's limit of 3 per minute"])
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert_refused(api_stack, post_batch(api_stack), 429, "rate_limited", before, [])
    # The other tenant has no limit: unaffected.
    assert post_job(api_stack, key=api_stack.other_key).status_code == 202

    # Retry-After: until the oldest counted submission leaves the 60 s window.
    set_rows(api_stack, Job, [first.json()["id"]], created_at=utcnow() - timedelta(seconds=45))
    r = post_job(api_stack)
    assert r.status_code == 429 and r.headers["Retry-After"] == "15", r.headers
    assert r.json()["error"]["message"].endswith("retry in 15 s")
    set_rows(api_stack, Job, [first.json()["id"]], created_at=utcnow() - timedelta(seconds=59))
    assert post_job(api_stack).headers["Retry-After"] == "1"  # rounded up: under a second is 1, never 0
    set_rows(api_stack, Job, [first.json()["id"]], created_at=utcnow() - timedelta(seconds=61))
    assert post_job(api_stack).status_code == 202  # it left the window: room for exactly one
    assert post_job(api_stack).status_code == 429


def test_rate_limit_zero_refuses_everything_and_none_clears_it(api_stack):
    set_limits(api_stack, requests_per_minute=0)
    before = api_stack.row_counts()
    assert_refused(api_stack, post_job(api_stack), 429, "rate_limited", before, ["limit of 0 per minute"])
    set_limits(api_stack, requests_per_minute=None)
    assert post_job(api_stack).status_code == 202


def test_max_waiting_jobs_counts_queued_jobs_plus_the_new_ones(api_stack):
    set_limits(api_stack, max_waiting_jobs=4)
    batch = post_batch(api_stack, batch_body(3)).json()
    single = post_job(api_stack)
    assert single.status_code == 202  # 3 + 1 == 4: exactly at the limit passes
    before = api_stack.row_counts()
    r = post_job(api_stack)
    assert_refused(api_stack, r, 429, "too_many_waiting", before,
                   ["max_waiting_jobs: 4 queued + 1 new job(s) exceeds the tenant's limit of 4 waiting jobs"])
    assert r.headers["Retry-After"] == "30"
    # A running job no longer waits; a batch must fit whole.
    set_rows(api_stack, Job, [batch["job_ids"][0]], status=JobStatus.running)
    assert_refused(api_stack, post_batch(api_stack, batch_body(2)), 429, "too_many_waiting", before,
                   ["3 queued + 2 new job(s) exceeds the tenant's limit of 4"])
    assert post_batch(api_stack, batch_body(1)).status_code == 202
    # Canceling a queued job makes room for one.
    assert api_stack.client.post(f"/v1/jobs/{single.json()['id']}/cancel", headers=api_stack.auth()).status_code == 200
    assert post_job(api_stack).status_code == 202
    assert post_job(api_stack).status_code == 429
    assert post_job(api_stack, key=api_stack.other_key).status_code == 202


def test_monthly_gpu_budget_refuses_with_403_once_used_reaches_it(api_stack):
    set_limits(api_stack, monthly_gpu_seconds=100)
    a, b = post_job(api_stack).json()["id"], post_job(api_stack).json()["id"]
    start, reset = month_bounds(utcnow())
    set_rows(api_stack, Job, [a], status=JobStatus.succeeded, finished_at=start + timedelta(seconds=1), gpu_seconds=60)
    set_rows(api_stack, Job, [b], status=JobStatus.failed, finished_at=start + timedelta(seconds=2), gpu_seconds=39.5)
    # Last month's work and the other tenant's do not count.
    old = post_job(api_stack).json()["id"]
    set_rows(api_stack, Job, [old], status=JobStatus.succeeded, finished_at=start - timedelta(seconds=1),
             gpu_seconds=1000)
    theirs = post_job(api_stack, key=api_stack.other_key).json()["id"]
    set_rows(api_stack, Job, [theirs], status=JobStatus.succeeded, finished_at=start + timedelta(seconds=1),
             gpu_seconds=1000)
    assert post_job(api_stack).status_code == 202  # 99.5 of 100 used: still allowed
    set_rows(api_stack, Job, [b], gpu_seconds=40)  # exactly at the budget: refused
    before = api_stack.row_counts()
    r = post_job(api_stack)
    assert_refused(api_stack, r, 403, "gpu_budget_exhausted", before, [
        "monthly_gpu_seconds: 100.0 GPU-seconds used this month reach the tenant's budget of 100 GPU-seconds",
        f"the budget resets at {reset.isoformat()}"])
    assert "retry-after" not in r.headers
    assert_refused(api_stack, post_batch(api_stack), 403, "gpu_budget_exhausted", before, [])
    assert post_job(api_stack, key=api_stack.other_key).status_code == 202
    set_limits(api_stack, monthly_gpu_seconds=100.5)
    assert post_job(api_stack).status_code == 202


def test_idempotent_replay_is_not_refused_by_a_limit(api_stack):
    key = {"Idempotency-Key": "limit-1"}
    set_limits(api_stack, requests_per_minute=1)
    first = post_job(api_stack, headers=key)
    assert first.status_code == 202
    replay = post_job(api_stack, headers=key)
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert post_job(api_stack).status_code == 429


def test_limits_are_checked_after_input_validation(api_stack):
    set_limits(api_stack, requests_per_minute=0)
    r = post_job(api_stack, job_body(width=100))
    assert r.status_code == 422 and r.json()["error"]["field"] == "width"


def test_only_a_rate_or_waiting_jobs_limit_locks_the_tenant_row(api_stack):
    """A submission holds its tenant's row from the check to its commit only when a limit counts
    what concurrent submissions add; otherwise one tenant's submissions run side by side."""
    if api_stack.name != "pg-s3-redis":
        pytest.skip("SQLite serializes writers: there is no row lock to observe")

    def holds_the_row() -> bool:
        with api_stack.session() as submitting, api_stack.session() as other:
            tenant = submitting.get(Tenant, api_stack.tenant_id)  # as the API-key lookup reads it
            limits.check_submission(submitting, tenant, new_jobs=1, now=utcnow())  # its transaction stays open
            other.execute(text("SET LOCAL lock_timeout = '200ms'"))
            try:
                other.execute(select(Tenant.id).where(Tenant.id == api_stack.tenant_id)
                              .with_for_update(key_share=True))
            except OperationalError:
                return True
            return False

    assert not holds_the_row()
    set_limits(api_stack, monthly_gpu_seconds=100)  # used GPU time does not grow with submissions
    assert not holds_the_row()
    set_limits(api_stack, max_waiting_jobs=10)
    assert holds_the_row()
    set_limits(api_stack, max_waiting_jobs=None, requests_per_minute=100)
    assert holds_the_row()


def test_month_bounds_roll_over_the_year():
    from datetime import UTC

    assert month_bounds(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert month_bounds(datetime(2026, 2, 10, tzinfo=UTC))[1] == datetime(2026, 3, 1, tzinfo=UTC)
