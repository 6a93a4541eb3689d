"""Idempotency-Key on every creating POST, on both stacks: same key and body → the original
response and nothing new; same key and another body → 409; concurrent repeats create once."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

JOB = {"task": "generate", "prompt": "a teapot", "width": 32, "height": 32, "seed": 5}


def test_same_key_same_body_replays_the_original_response(api_stack):
    headers = {**api_stack.auth(), "Idempotency-Key": "order-42"}
    first = api_stack.client.post("/v1/jobs", json=JOB, headers=headers)
    assert first.status_code == 202
    snapshot = api_stack.snapshot()
    # Key order and spacing do not matter; the job's later progress does not leak into the replay.
    api_stack.client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=api_stack.auth())
    again = api_stack.client.post("/v1/jobs", json=dict(reversed(list(JOB.items()))), headers=headers)
    assert again.status_code == 202 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    rows, objects, messages = api_stack.snapshot()
    assert (rows["jobs"], objects, messages) == (snapshot[0]["jobs"], snapshot[1], snapshot[2])


def test_same_key_different_body_is_a_conflict(api_stack):
    headers = {**api_stack.auth(), "Idempotency-Key": "k1"}
    assert api_stack.client.post("/v1/jobs", json=JOB, headers=headers).status_code == 202
    before = api_stack.snapshot()
    r = api_stack.client.post("/v1/jobs", json={**JOB, "prompt": "a kettle"}, headers=headers)
    assert r.status_code == 409
    assert r.json()["error"] == {"code": "idempotency_conflict", "field": "Idempotency-Key",
                                 "message": "Idempotency-Key: 'k1' was already used with a different request "
                                            "(POST /v1/jobs)"}
    batch = {"task": "generate", "items": [{"prompt": "x", "width": 32, "height": 32}]}
    assert api_stack.client.post("/v1/batches", json=batch, headers=headers).status_code == 409
    assert api_stack.snapshot() == before


def test_keys_are_per_tenant(api_stack):
    mine = api_stack.client.post("/v1/jobs", json=JOB, headers={**api_stack.auth(), "Idempotency-Key": "shared"})
    theirs = api_stack.client.post("/v1/jobs", json=JOB, headers={**api_stack.auth(api_stack.other_key),
                                                                 "Idempotency-Key": "shared"})
    assert theirs.status_code == 202 and theirs.json()["id"] != mine.json()["id"]


def test_batches_and_files_are_idempotent_too(api_stack):
    product = api_stack.upload_png(key=None)
    headers = {**api_stack.auth(), "Idempotency-Key": "batch-7"}
    body = {"task": "tryon", "product_file": product, "items": [{"prompt": "beach"}, {"prompt": "desk"}]}
    first = api_stack.client.post("/v1/batches", json=body, headers=headers)
    again = api_stack.client.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == again.status_code == 202 and again.json() == first.json()
    assert api_stack.row_counts()["batches"] == 1
    files_headers = {**api_stack.auth(), "Idempotency-Key": "upload-1"}

    def encoded(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        return buf.getvalue()

    up1 = api_stack.client.post("/v1/files", headers=files_headers, files={"file": ("a.png", encoded((1, 2, 3)))})
    up2 = api_stack.client.post("/v1/files", headers=files_headers, files={"file": ("a.png", encoded((1, 2, 3)))})
    assert up1.status_code == up2.status_code == 201 and up1.json() == up2.json()
    up3 = api_stack.client.post("/v1/files", headers=files_headers, files={"file": ("a.png", encoded((9, 9, 9)))})
    assert up3.status_code == 409


def test_invalid_requests_do_not_burn_the_key(api_stack):
    headers = {**api_stack.auth(), "Idempotency-Key": "retry-me"}
    bad = api_stack.client.post("/v1/jobs", json={**JOB, "width": 30}, headers=headers)
    assert bad.status_code == 422
    assert api_stack.client.post("/v1/jobs", json=JOB, headers=headers).status_code == 202


def test_overlong_key_is_refused(api_stack):
    r = api_stack.client.post("/v1/jobs", json=JOB, headers={**api_stack.auth(), "Idempotency-Key": "k" * 300})
    assert r.status_code == 422 and r.json()["error"]["field"] == "Idempotency-Key"


@pytest.mark.timeout(120)
def test_concurrent_requests_with_one_key_create_one_job(api_stack):
    from fastapi.testclient import TestClient

    headers = {**api_stack.auth(), "Idempotency-Key": "race"}
    barrier = threading.Barrier(4)
    responses = []

    def post():
        with TestClient(api_stack.client.app) as client:
            barrier.wait()
            responses.append(client.post("/v1/jobs", json=JOB, headers=headers))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in responses] == [202] * 4
    assert len({r.json()["id"] for r in responses}) == 1
    assert api_stack.row_counts()["jobs"] == 1
