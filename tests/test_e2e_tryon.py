"""The whole product path through the HTTP API, on both stacks, with real processes: API
(uvicorn), GPU worker (tiny real engine), webhook worker, reconciler.

Upload a product image, submit a try-on batch (one item with think), watch progress, receive
the signed ``batch.completed`` webhook (verified with the independent ``standardwebhooks``
package), and download every result through the URL the API hands out (presigned S3 on the
production stack, signed API route on the embedded one).
"""

from __future__ import annotations

import io

import httpx
import standardwebhooks
from PIL import Image

from tests.fixtures.worker import Stack, wait_until
from worker import tenants
from worker.dev.demo import product_image
from worker.dev.receiver import WebhookReceiver

SCENES = ["on a beach at sunset", "on a kitchen counter", "in a snowy forest"]


def test_tryon_batch_end_to_end_through_the_http_api(stack: Stack, receiver: WebhookReceiver) -> None:
    for role in ("api", "gpu", "webhooks", "reconciler"):
        stack.start(role)
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "shop")
        _, key = tenants.create_api_key(s, tenant.id)
    client = httpx.Client(base_url=stack.api_url(), headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert client.get("/readyz").status_code == 200

    up = client.post("/v1/files", files={"file": ("mug.png", product_image(64), "image/png")})
    assert up.status_code == 201 or up.status_code == 200, up.text
    items = [{"prompt": scene, "seed": i, "think": i == 0} for i, scene in enumerate(SCENES)]
    r = client.post("/v1/batches", json={"task": "tryon", "product_file": up.json()["id"], "items": items,
                                         "params": {"num_timesteps": 2, "max_think_tokens": 8},
                                         "webhook_url": receiver.url}, headers={"idempotency-key": "e2e-1"})
    assert r.status_code == 202, r.text
    batch = r.json()
    assert len(batch["job_ids"]) == len(SCENES)

    seen_progress: list[float] = []

    def completed() -> dict | None:
        state = client.get(f"/v1/batches/{batch['id']}").json()
        seen_progress.append(state["progress"])
        return state if state["completed_at"] else None

    state = wait_until(completed, 240, 0.2, "the batch to complete")
    assert state["counts"]["succeeded"] == len(SCENES) and state["progress"] == 1.0
    assert seen_progress == sorted(seen_progress)  # progress never goes backwards

    hook = receiver.wait_for("batch.completed", timeout_s=30)[0]
    payload = standardwebhooks.Webhook(tenant.webhook_secret).verify(hook.body, hook.headers)
    assert [j["job_id"] for j in payload["data"]["jobs"]] == batch["job_ids"]
    assert {j["status"] for j in payload["data"]["jobs"]} == {"succeeded"}

    page = client.get(f"/v1/batches/{batch['id']}/jobs").json()
    assert [j["id"] for j in page["items"]] == batch["job_ids"]
    for job in page["items"]:
        assert job["status"] == "succeeded" and job["attempts"] == 1
        assert job["timings"]["model_seconds"] > 0
        url = job["result"]["url"]
        if stack.settings.storage_backend == "s3":
            assert url.startswith(stack.settings.s3_endpoint_url) and "Signature" in url
        img = Image.open(io.BytesIO(httpx.get(url, timeout=30).raise_for_status().content))
        assert img.format == "PNG" and min(img.size) >= 16
    assert page["items"][0]["result"]["think_text"]
    assert page["items"][1]["result"]["think_text"] is None
    # the webhook's manifest URLs work as well
    assert httpx.get(payload["data"]["jobs"][0]["output_url"], timeout=30).status_code == 200
