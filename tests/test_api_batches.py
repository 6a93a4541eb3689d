"""POST/GET /v1/batches, its job pages and cancel on both stacks: the try-on form and the
general form, jobs waiting in the database until the dispatcher chunks them (chunking visible as
broker messages then), oversized and invalid batches refused with nothing stored or enqueued,
tenants isolated."""

from __future__ import annotations

from sqlalchemy import select

from worker import chunks, jobs, queries
from worker.models import WebhookDelivery, Worker, WorkerState, utcnow
from worker.scheduler import Dispatcher

SCENES = ["on a marble kitchen counter", "on a picnic blanket in a park", "on an office desk at night",
          "on a wooden shelf with plants"]


def tryon_body(product: str, **extra):
    items = [{"prompt": scene, "seed": i} for i, scene in enumerate(SCENES)]
    items[1]["think"] = True
    return {"task": "tryon", "product_file": product, "items": items, "params": {"num_timesteps": 4},
            "webhook_url": "http://127.0.0.1:9/hook", "metadata": {"campaign": "spring"}, **extra}


def test_tryon_batch_is_accepted_chunked_and_readable(api_stack):
    product = api_stack.upload_png()
    before = api_stack.queued_messages()
    r = api_stack.client.post("/v1/batches", json=tryon_body(product), headers=api_stack.auth())
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["job_count"] == 4 and len(batch["job_ids"]) == 4 and batch["status"] == "active"
    assert batch["counts"]["queued"] == 4 and batch["progress"] == 0.0 and batch["metadata"] == {"campaign": "spring"}
    assert api_stack.queued_messages() == before  # the API publishes nothing: the jobs wait
    with api_stack.session() as s:
        rows = queries.load_jobs(s, batch["job_ids"])
        assert all(j.chunk_id is None for j in rows)
        now = utcnow()  # a live GPU worker, for the dispatcher to fill its window
        s.add(Worker(id="gpu-1", state=WorkerState.ready, started_at=now, last_seen=now))
        s.commit()
    # Three items share product + size + think=false → one chunk; the think item is its own.
    report = Dispatcher(api_stack.settings, api_stack.session, "test-dispatcher").dispatch_once()
    assert (report.formed, report.published) == (2, 2)
    assert api_stack.queued_messages() == before + 2
    with api_stack.session() as s:
        chunk_of = {j.id: j.chunk_id for j in queries.load_jobs(s, batch["job_ids"])}
    assert len(set(chunk_of.values())) == 2 and None not in chunk_of.values()
    assert len({chunk_of[batch["job_ids"][i]] for i in (0, 2, 3)}) == 1
    page = api_stack.client.get(f"/v1/batches/{batch['id']}/jobs?page=1&page_size=3", headers=api_stack.auth())
    assert page.status_code == 200
    body = page.json()
    assert body["total"] == 4 and body["next_page"] == 2 and len(body["items"]) == 3
    assert [j["prompt"] for j in body["items"]] == SCENES[:3]
    assert [j["params"]["seed"] for j in body["items"]] == [0, 1, 2]
    assert body["items"][1]["think"] is True and body["items"][0]["think"] is False
    assert all(j["task"] == "tryon" and j["input_file_ids"] == [product] for j in body["items"])
    last = api_stack.client.get(f"/v1/batches/{batch['id']}/jobs?page=2&page_size=3", headers=api_stack.auth()).json()
    assert [j["id"] for j in last["items"]] == batch["job_ids"][3:] and last["next_page"] is None
    got = api_stack.client.get(f"/v1/batches/{batch['id']}", headers=api_stack.auth()).json()
    assert got["counts"] == batch["counts"] and got["job_ids"] is None


def test_general_batch_with_per_item_tasks(api_stack):
    image = api_stack.upload_png()
    r = api_stack.client.post("/v1/batches", headers=api_stack.auth(), json={"items": [
        {"task": "generate", "prompt": "a lamp", "width": 64, "height": 64},
        {"task": "edit", "prompt": "make it blue", "input_file_ids": [image]},
        {"task": "understand", "prompt": "what is it?", "input_file_ids": [image], "params": {"max_new_tokens": 16}},
    ]})
    assert r.status_code == 202, r.text
    with api_stack.session() as s:
        rows = queries.load_jobs(s, r.json()["job_ids"])
    assert [j.task for j in rows] == ["generate", "edit", "understand"]
    assert rows[2].params["max_new_tokens"] == 16 and (rows[0].width, rows[0].height) == (64, 64)
    assert len({j.chunk_key for j in rows}) == 3  # different tasks never share a chunk
    assert all(j.chunk_id is None for j in rows)


def test_oversized_batch_is_refused_and_nothing_is_stored_or_enqueued(api_stack):
    product = api_stack.upload_png()
    limit = api_stack.settings.max_batch_items
    before = api_stack.snapshot()
    items = [{"prompt": f"scene {i}"} for i in range(limit + 1)]
    r = api_stack.client.post("/v1/batches", headers=api_stack.auth(),
                              json={"task": "tryon", "product_file": product, "items": items})
    assert r.status_code == 413
    assert r.json()["error"] == {"code": "batch_too_large", "field": "items",
                                 "message": f"items: {limit + 1} items exceeds the {limit} item limit"}
    assert api_stack.snapshot() == before


def test_one_bad_item_refuses_the_whole_batch(api_stack):
    product = api_stack.upload_png()
    before = api_stack.snapshot()
    body = tryon_body(product)
    body["items"][2]["params"] = {"num_timesteps": 5000}
    r = api_stack.client.post("/v1/batches", json=body, headers=api_stack.auth())
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "items[2].params.num_timesteps"
    assert "less than or equal to 200" in r.json()["error"]["message"]
    body = tryon_body(product)
    body["items"][3]["width"] = 64  # try-on takes the product image's size
    r = api_stack.client.post("/v1/batches", json=body, headers=api_stack.auth())
    assert r.status_code == 422 and r.json()["error"]["field"] == "items[3].width"
    assert r.json()["error"]["message"].startswith("items[3].width: not accepted for task 'tryon'")
    r = api_stack.client.post("/v1/batches", json={"items": [{"prompt": "no task"}]}, headers=api_stack.auth())
    assert r.status_code == 422 and r.json()["error"]["field"] == "items[0].task"
    r = api_stack.client.post("/v1/batches", json=tryon_body("missing-file"), headers=api_stack.auth())
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "unknown_file", "field": "product_file", "message": "product_file: file 'missing-file' not found"}
    r = api_stack.client.post("/v1/batches", json={"task": "generate", "items": []}, headers=api_stack.auth())
    assert r.status_code == 422 and r.json()["error"]["field"] == "items"
    assert api_stack.snapshot() == before


def test_control_characters_anywhere_in_a_batch_are_422s_naming_the_field(api_stack):
    product = api_stack.upload_png()
    before = api_stack.snapshot()
    cases = []
    body = tryon_body(product)
    body["items"][3]["prompt"] = "on a \u0000 beach"
    cases.append((body, "items[3].prompt", "items[3].prompt: contains the control character U+0000 at position 5"))
    body = tryon_body(product)
    body["items"][1]["metadata"] = {"shot": {"sku": "M\u00001"}}
    cases.append((body, "items[1].metadata.shot.sku",
                  "items[1].metadata.shot.sku: contains the control character U+0000 at position 1"))
    cases.append((tryon_body(product, metadata={"campaign": "spr\u001bing"}), "metadata.campaign",
                  "metadata.campaign: contains the control character U+001B at position 3"))
    cases.append((tryon_body(product, webhook_url="http://127.0.0.1:9/\u0000"), "webhook_url",
                  "webhook_url: contains the control character U+0000 at position 19"))
    cases.append((tryon_body(product + "\u0000"), "product_file",
                  f"product_file: contains the control character U+0000 at position {len(product)}"))
    for body, field, message in cases:
        r = api_stack.client.post("/v1/batches", json=body, headers=api_stack.auth())
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["field"], error["message"]) == (field, message)
    assert api_stack.snapshot() == before


def test_cancel_batch_and_tenant_isolation(api_stack):
    product = api_stack.upload_png()
    batch = api_stack.client.post("/v1/batches", json=tryon_body(product), headers=api_stack.auth()).json()
    other = api_stack.auth(api_stack.other_key)
    for path in (f"/v1/batches/{batch['id']}", f"/v1/batches/{batch['id']}/jobs"):
        assert api_stack.client.get(path, headers=other).status_code == 404
    assert api_stack.client.post(f"/v1/batches/{batch['id']}/cancel", headers=other).status_code == 404
    assert api_stack.client.get(f"/v1/jobs/{batch['job_ids'][0]}", headers=other).status_code == 404
    with api_stack.session() as s:  # the think item: chunked by the dispatcher, claimed by a worker
        chunk_id = chunks.form_chunk(s, [batch["job_ids"][1]], utcnow())
        s.commit()
        chunks.claim_chunk(s, chunk_id, "worker-1", lease_s=60)
    r = api_stack.client.post(f"/v1/batches/{batch['id']}/cancel", headers=api_stack.auth())
    assert r.status_code == 200
    body = r.json()
    assert body["cancel_requested"] is True and body["status"] == "active"
    assert body["counts"] == {"queued": 0, "running": 1, "succeeded": 0, "failed": 0, "canceled": 3, "expired": 0}
    with api_stack.session() as s:
        assert jobs.mark_canceled(s, batch["job_ids"][1], "worker-1")
    done = api_stack.client.get(f"/v1/batches/{batch['id']}", headers=api_stack.auth()).json()
    assert done["status"] == "completed" and done["completed_at"] is not None and done["progress"] == 1.0
    with api_stack.session() as s:
        events = [d.event for d in s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)).all()]
    assert events == ["batch.progress", "batch.completed"]  # cancels send no job event


def test_page_bounds_are_validated(api_stack):
    r = api_stack.client.get("/v1/batches/x/jobs?page=0", headers=api_stack.auth())
    assert r.status_code == 422 and r.json()["error"]["field"] == "page"
    r = api_stack.client.get("/v1/batches/x/jobs?page_size=1000", headers=api_stack.auth())
    assert r.status_code == 422 and "less than or equal to 200" in r.json()["error"]["message"]
