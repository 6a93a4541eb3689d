"""Edit and try-on output sizes, through the HTTP API with real processes (API, GPU worker on the
tiny service checkpoint, reconciler): the width and height a job shows from submission on are the
size of the picture it delivers — the input's size as the model resizes it (short side raised to
the checkpoint's minimum, sides rounded to 16) — and a size given for such a job is refused with
that rule in the message."""

from __future__ import annotations

import io

import httpx
from PIL import Image

from tests.fixtures.worker import SERVICE_MODEL_MIN_SIDE_PX, Stack, wait_jobs
from worker import tenants


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_tryon_job_states_at_submit_the_size_of_the_picture_it_delivers(stack: Stack) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "shop")
        _, key = tenants.create_api_key(s, tenant.id)
    client = httpx.Client(base_url=stack.api_url(), headers={"authorization": f"Bearer {key}"}, timeout=30)

    # (input, expected output): a short side below the 64-px minimum is raised to it (40x24 → x2.67
    # → 107x64 → 112x64 on the 16-px grid); a larger one only snaps to the grid (100x80 → 96x80).
    expected = {(40, 24): (112, 64), (100, 80): (96, 80)}
    submitted = {}
    for size, out in expected.items():
        up = client.post("/v1/files", files={"file": ("product.png", _png(size), "image/png")})
        assert up.status_code == 201, up.text
        r = client.post("/v1/jobs", json={"task": "tryon", "prompt": "on a beach", "input_file_ids": [up.json()["id"]],
                                          "params": {"num_timesteps": 2}})
        assert r.status_code == 202, r.text
        assert (r.json()["width"], r.json()["height"]) == out, (size, r.json())
        submitted[r.json()["id"]] = out

    wait_jobs(stack, list(submitted), {"succeeded"}, timeout_s=120)
    for job_id, out in submitted.items():
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert (job["width"], job["height"]) == out
        picture = Image.open(io.BytesIO(httpx.get(job["result"]["url"], timeout=30).raise_for_status().content))
        assert picture.size == out

    refused = client.post("/v1/jobs", json={"task": "tryon", "prompt": "x", "input_file_ids": [up.json()["id"]],
                                            "width": 128})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "width"
    assert (f"width: not accepted for task 'tryon' (the output has the input picture's size, scaled so that its "
            f"short side is at least {SERVICE_MODEL_MIN_SIDE_PX} px and its long side at most 1024 px"
            ) in refused.json()["error"]["message"]
