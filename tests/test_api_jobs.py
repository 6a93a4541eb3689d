"""POST/GET /v1/jobs and cancel on both stacks: a submitted job waits in the database (no chunk,
no broker message: the dispatcher hands it out), parameters are resolved, bad parameters are
422s naming field and limit with nothing stored or enqueued, results come back as working URLs,
tenants are isolated."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import event, select

from worker import chunks, jobs, queries
from worker.models import Chunk, utcnow
from worker.storage import output_key


def submit(stack, body, key=None, **kw):
    return stack.client.post("/v1/jobs", json=body, headers=stack.auth(key), **kw)


def claim(stack, job_id: str, worker_id: str = "worker-1") -> None:
    """What the dispatcher and a GPU worker do for a waiting job: a chunk taking it, claimed."""
    with stack.session() as s:
        chunk_id = chunks.form_chunk(s, [job_id], utcnow())
        s.commit()
        assert [j.id for j in chunks.claim_chunk(s, chunk_id, worker_id, lease_s=60)] == [job_id]


def fetch(stack, url: str) -> httpx.Response:
    """GET a result URL: through the app for local storage, over HTTP for S3."""
    if url.startswith(stack.settings.public_base_url):
        parts = urlsplit(url)
        return stack.client.get(f"{parts.path}?{parts.query}")
    return httpx.get(url)


def test_generate_job_is_queued_waiting_for_the_dispatcher_and_readable(api_stack):
    before_messages = api_stack.queued_messages()
    r = submit(api_stack, {"task": "generate", "prompt": "a red mug", "width": 64, "height": 32,
                           "params": {"num_timesteps": 4}, "metadata": {"sku": "M-1"}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["task"] == "generate" and (job["width"], job["height"]) == (64, 32)
    assert job["params"]["num_timesteps"] == 4 and job["params"]["cfg_text_scale"] == 4.0
    assert isinstance(job["params"]["seed"], int) and job["result"] is None and job["error"] is None
    assert job["params"]["taylorseer"] is False  # the record says which sampling mode made the image
    assert job["progress"] == {"step": 0, "total": 3} and job["metadata"] == {"sku": "M-1"}
    assert api_stack.queued_messages() == before_messages  # the API publishes nothing
    with api_stack.session() as s:
        assert s.scalars(select(Chunk)).all() == []
        assert queries.load_jobs(s, [job["id"]])[0].chunk_id is None  # waiting for the dispatcher
    got = api_stack.client.get(f"/v1/jobs/{job['id']}", headers=api_stack.auth())
    assert got.status_code == 200 and got.json()["id"] == job["id"]


def test_a_submission_without_limits_runs_the_key_lookup_and_its_inserts_only(api_stack):
    """No tenant lock, no read-back: one job is the key lookup and one INSERT; a batch adds its
    batch row, inserts its jobs in one executemany and reads its counts for the reply."""
    statements: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _executemany) -> None:
        if not statement.startswith(("BEGIN", "PRAGMA")):  # SQLite's BEGIN IMMEDIATE, per-connection set-up
            statements.append(" ".join(statement.split()))

    def heads() -> list[str]:
        return [" ".join(s.split()[:3]) for s in statements]

    engine = api_stack.client.app.state.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        assert submit(api_stack, {"task": "generate", "prompt": "a mug"}).status_code == 202
        assert [h.split()[0] for h in heads()] == ["SELECT", "INSERT"]  # the key lookup, the job
        assert heads()[1] == "INSERT INTO jobs" and " FOR " not in statements[0]
        statements.clear()
        r = api_stack.client.post("/v1/batches", headers=api_stack.auth(),
                                  json={"task": "generate", "items": [{"prompt": f"mug {i}"} for i in range(20)]})
        assert r.status_code == 202
        assert heads().count("INSERT INTO batches") == 1 and heads().count("INSERT INTO jobs") == 1
        assert not any(" FOR " in s or s.startswith("UPDATE") for s in statements)
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_tryon_edit_and_understand_jobs_take_files(api_stack):
    product = api_stack.upload_png()
    tryon = submit(api_stack, {"task": "tryon", "prompt": "on a beach towel", "input_file_ids": [product],
                               "seed": 11, "think": True})
    assert tryon.status_code == 202, tryon.text
    body = tryon.json()
    assert body["params"]["seed"] == 11 and body["params"]["cfg_img_scale"] == 2.5 and body["think"] is True
    cached = submit(api_stack, {"task": "tryon", "prompt": "on a rock", "input_file_ids": [product],
                                "params": {"taylorseer": True}})
    assert cached.status_code == 202 and cached.json()["params"]["taylorseer"] is True
    # The 32² product as the (demo) model resizes it: short side raised to its 256 px minimum.
    assert (body["width"], body["height"]) == (256, 256) and body["input_file_ids"] == [product]
    understand = submit(api_stack, {"task": "understand", "prompt": "What is this?", "input_file_ids": [product]})
    assert understand.status_code == 202 and understand.json()["progress"]["total"] == 0
    assert (understand.json()["width"], understand.json()["height"]) == (None, None)


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"task": "paint", "prompt": "x"}, "task", "task: Input should be 'generate', 'edit', 'understand' or 'tryon'"),
    ({"task": "generate", "prompt": ""}, "prompt", "prompt: String should have at least 1 character"),
    ({"task": "generate", "prompt": "x", "params": {"num_timesteps": 1}}, "params.num_timesteps",
     "params.num_timesteps: Input should be greater than or equal to 2 (limit: >= 2"),
    ({"task": "generate", "prompt": "x", "params": {"cfg_text_scale": 99}}, "params.cfg_text_scale",
     "params.cfg_text_scale: Input should be less than or equal to 30"),
    ({"task": "generate", "prompt": "x", "params": {"cfg_interval": [0.9, 0.1]}}, "params.cfg_interval",
     "params.cfg_interval: start 0.9 is after end 0.1"),
    ({"task": "generate", "prompt": "x", "params": {"steps": 3}}, "params.steps", "params.steps: Extra inputs"),
    ({"task": "generate", "prompt": "x", "params": {"taylorseer": "often"}}, "params.taylorseer",
     "params.taylorseer: Input should be a valid boolean"),
    ({"task": "generate", "prompt": "x", "width": 2048}, "width", "width: 2048 px is outside 16..1024 px"),
    ({"task": "generate", "prompt": "x", "width": 100}, "width", "width: 100 px is not a multiple of 16"),
    ({"task": "generate", "prompt": "x", "input_file_ids": ["f"]}, "input_file_ids",
     "input_file_ids: task 'generate' takes 0 input image(s), got 1"),
    ({"task": "edit", "prompt": "x", "input_file_ids": ["nope"]}, "input_file_ids[0]",
     "input_file_ids[0]: file 'nope' not found"),
    ({"task": "tryon", "prompt": "x"}, "input_file_ids", "input_file_ids: task 'tryon' takes 1 input image(s), got 0"),
    ({"task": "generate", "prompt": "x", "seed": -3}, "seed", "seed: Input should be greater than or equal to 0"),
    ({"task": "generate", "prompt": "x", "webhook_url": "ftp://h/x"}, "webhook_url",
     "webhook_url: scheme 'ftp' is not allowed"),
    ({"task": "generate", "prompt": "x", "metadata": {"blob": "x" * 20000}}, "metadata",
     "metadata: 20,011 bytes of JSON exceeds the 16,384 byte limit"),
    # Control characters: Postgres cannot store NUL, so each text field refuses them up front.
    ({"task": "generate", "prompt": "hello\u0000world"}, "prompt",
     "prompt: contains the control character U+0000 at position 5"),
    ({"task": "generate", "prompt": "bell\u0007"}, "prompt",
     "prompt: contains the control character U+0007 at position 4"),
    ({"task": "generate", "prompt": "x", "metadata": {"product": {"sku": "A\u0000B"}}}, "metadata.product.sku",
     "metadata.product.sku: contains the control character U+0000 at position 1"),
    ({"task": "generate", "prompt": "x", "metadata": {"tags": ["ok", "b\u0000"]}}, "metadata.tags[1]",
     "metadata.tags[1]: contains the control character U+0000 at position 1"),
    ({"task": "generate", "prompt": "x", "metadata": {"s\u0000ku": 1}}, "metadata",
     "metadata: key 's\\x00ku' contains the control character U+0000 at position 1"),
    ({"task": "generate", "prompt": "x", "webhook_url": "https://example.com/\u0000hook"}, "webhook_url",
     "webhook_url: contains the control character U+0000 at position 20"),
    ({"task": "generate", "prompt": "x", "webhook_url": "https://example.com/a\tb"}, "webhook_url",
     "webhook_url: contains the control character U+0009 at position 21"),
    ({"task": "edit", "prompt": "x", "input_file_ids": ["f\u0000"]}, "input_file_ids[0]",
     "input_file_ids[0]: contains the control character U+0000 at position 1"),
])
def test_bad_parameters_are_422_naming_the_field_and_nothing_is_stored_or_enqueued(api_stack, body, field, message):
    before = api_stack.snapshot()
    r = submit(api_stack, body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["message"].startswith(message), error
    assert error["code"] in ("invalid_input", "invalid_parameter", "unknown_file", "invalid_webhook_url")
    assert api_stack.snapshot() == before


def test_malformed_json_is_a_422_not_a_500(api_stack):
    r = api_stack.client.post("/v1/jobs", content=b"{not json", headers={**api_stack.auth(),
                                                                        "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


def test_malformed_json_names_the_body_and_where_the_error_is(api_stack):
    before = api_stack.snapshot()
    r = api_stack.client.post("/v1/jobs", content=b'{"task": "generate",\n "prompt": "x" "seed": 1}',
                              headers={**api_stack.auth(), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_input", "field": "body",
                                 "message": "body: invalid JSON at line 2, column 16: Expecting ',' delimiter"}
    assert api_stack.snapshot() == before


def test_tabs_and_newlines_are_kept_in_prompts_and_metadata(api_stack):
    r = submit(api_stack, {"task": "generate", "prompt": "line one\n\tline two\r\n", "width": 32, "height": 32,
                           "metadata": {"note": "a\tb\nc"}})
    assert r.status_code == 202, r.text
    assert r.json()["prompt"] == "line one\n\tline two\r\n" and r.json()["metadata"] == {"note": "a\tb\nc"}


def test_control_characters_in_the_idempotency_key_are_refused(api_stack):
    before = api_stack.snapshot()
    r = api_stack.client.post("/v1/jobs", json={"task": "generate", "prompt": "x"},
                              headers={**api_stack.auth(), "Idempotency-Key": "k\x01"})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_parameter", "field": "Idempotency-Key",
                                 "message": "Idempotency-Key: contains the control character U+0001 at position 1"}
    assert api_stack.snapshot() == before


def test_private_webhook_targets_are_refused_unless_allowed(api_stack):
    from fastapi.testclient import TestClient

    from api.main import create_app

    strict = api_stack.settings.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(strict)) as client:
        r = client.post("/v1/jobs", headers=api_stack.auth(), json={
            "task": "generate", "prompt": "x", "webhook_url": "http://127.0.0.1:9000/hook"})
        assert r.status_code == 422
        assert r.json()["error"]["message"] == ("webhook_url: host '127.0.0.1' is the non-public address "
                                                "127.0.0.1 (private targets are not allowed)")
    r = submit(api_stack, {"task": "generate", "prompt": "x", "webhook_url": "http://127.0.0.1:9000/hook"})
    assert r.status_code == 202 and r.json()["webhook_url"] == "http://127.0.0.1:9000/hook"


def test_other_tenants_get_404_for_jobs(api_stack):
    job_id = submit(api_stack, {"task": "generate", "prompt": "x", "width": 32, "height": 32}).json()["id"]
    other = api_stack.auth(api_stack.other_key)
    assert api_stack.client.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
    r = api_stack.client.post(f"/v1/jobs/{job_id}/cancel", headers=other)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert api_stack.client.get(f"/v1/jobs/{job_id}", headers=api_stack.auth()).json()["status"] == "queued"
    product = api_stack.upload_png(key=api_stack.other_key)  # another tenant's file is not usable
    r = submit(api_stack, {"task": "edit", "prompt": "x", "input_file_ids": [product]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_file"


def test_cancel_queued_job_is_immediate_and_running_is_requested(api_stack):
    a = submit(api_stack, {"task": "generate", "prompt": "a", "width": 32, "height": 32}).json()
    r = api_stack.client.post(f"/v1/jobs/{a['id']}/cancel", headers=api_stack.auth())
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    b = submit(api_stack, {"task": "generate", "prompt": "b", "width": 32, "height": 32}).json()
    claim(api_stack, b["id"])
    r = api_stack.client.post(f"/v1/jobs/{b['id']}/cancel", headers=api_stack.auth())
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True


def test_succeeded_job_shows_a_working_result_url(api_stack):
    job = submit(api_stack, {"task": "generate", "prompt": "a", "width": 32, "height": 32, "think": True}).json()
    store = api_stack.client.app.state.store
    key = output_key(api_stack.tenant_id, job["id"])
    claim(api_stack, job["id"])
    with api_stack.session() as s:
        jobs.record_progress(s, [job["id"]], "worker-1", 2, 50)
    running = api_stack.client.get(f"/v1/jobs/{job['id']}", headers=api_stack.auth()).json()
    assert running["status"] == "running" and running["progress"] == {"step": 2, "total": 50}
    assert running["timings"]["started_at"] is not None and running["attempts"] == 1
    store.put(key, b"\x89PNG result bytes", "image/png")
    with api_stack.session() as s:
        assert jobs.complete_job(s, job["id"], "worker-1", output_key=key, think_text="plan", model_seconds=1.5)
    done = api_stack.client.get(f"/v1/jobs/{job['id']}", headers=api_stack.auth()).json()
    assert done["status"] == "succeeded" and done["timings"]["model_seconds"] == 1.5
    assert done["result"]["think_text"] == "plan" and done["result"]["content_type"] == "image/png"
    response = fetch(api_stack, done["result"]["url"])
    assert response.status_code == 200 and response.content == b"\x89PNG result bytes"
    tampered = done["result"]["url"].replace(job["id"], job["id"][:-1] + ("0" if job["id"][-1] != "0" else "1"))
    assert fetch(api_stack, tampered).status_code == 403


def test_objects_route_refuses_bad_signatures(api_stack):
    r = api_stack.client.get(f"/v1/objects/results/x/y.png?expires=99999999999&sig={'0' * 64}")
    assert r.status_code == (403 if api_stack.settings.storage_backend == "local" else 404)
    r = api_stack.client.get("/v1/objects/results/x/y.png?expires=1&sig=short")
    assert r.status_code == 422 and r.json()["error"]["field"] == "sig"
