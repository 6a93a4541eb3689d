"""``bagel-jobs demo``: a real try-on batch through the HTTP API of a running stack.

Owns: the demo client. It waits for ``/readyz``, gets a tenant (creates one in the configured
database unless ``--api-key`` is given), draws a product picture (a mug, so no asset ships in
the repo), uploads it, submits one try-on batch of four scene prompts (think on the first),
shows a progress bar until the batch completes, waits for the ``batch.completed`` webhook on a
local receiver and verifies its signature with the independent ``standardwebhooks`` package,
then downloads the images and writes them with ``summary.json`` to the output folder. Talks
to the service only over HTTP (plus the one-time tenant creation).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from PIL import Image, ImageDraw
from tqdm import tqdm

from worker.dev.receiver import WebhookReceiver

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

SCENES = (
    "the mug on a sunlit wooden breakfast table next to a croissant",
    "the mug on a marble kitchen counter, soft morning light",
    "the mug on a desk beside a laptop in a cozy home office",
    "the mug held in a hand outdoors on a snowy mountain trail",
)
POLL_S = 0.25
WEBHOOK_WAIT_S = 60.0
DEMO_STEPS = 8


def product_image(size_px: int = 256) -> bytes:
    """A simple product shot drawn in code: a red mug with a white logo on a light backdrop."""
    img = Image.new("RGB", (size_px, size_px), (236, 236, 232))
    d = ImageDraw.Draw(img)
    s = size_px / 256
    d.ellipse([60 * s, 200 * s, 196 * s, 224 * s], fill=(200, 200, 196))  # shadow
    d.rectangle([70 * s, 70 * s, 170 * s, 210 * s], fill=(196, 30, 45))  # body
    d.ellipse([70 * s, 60 * s, 170 * s, 82 * s], fill=(150, 20, 32))  # rim
    d.arc([150 * s, 100 * s, 210 * s, 170 * s], start=-90, end=90, fill=(196, 30, 45), width=int(12 * s))
    d.ellipse([100 * s, 115 * s, 140 * s, 155 * s], outline=(255, 255, 255), width=int(5 * s))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _wait_ready(client: httpx.Client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = client.get("/readyz")
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"the API at {client.base_url} was not ready within {timeout_s:.0f} s ({last})")


def _demo_tenant(settings: Settings) -> tuple[str, str]:
    from worker import tenants
    from worker.db import make_engine, session_factory

    engine = make_engine(settings)
    try:
        with session_factory(engine)() as s:
            tenant = tenants.create_tenant(s, f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}")
            _, key = tenants.create_api_key(s, tenant.id, name="demo")
            return key, tenant.webhook_secret
    finally:
        engine.dispose()


def _check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code >= 400:
        raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def _jobs_of(client: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        body = _check(client.get(f"/v1/batches/{batch_id}/jobs", params={"page": page}), "list jobs")
        got = body["items"]
        items.extend(got)
        if not got or not body.get("next_page"):
            return items
        page = int(body["next_page"])


def run_demo(settings: Settings, *, api_url: str | None, out_dir: str | Path, wait_ready_s: float,
             api_key: str | None = None, webhook_secret: str | None = None, steps: int | None = None,
             receiver_host: str = "127.0.0.1") -> int:
    """Run the demo; returns 0 when every job succeeded and the webhook verified."""
    import standardwebhooks

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = (api_url or settings.public_base_url).rstrip("/")
    if api_key is not None and not webhook_secret:
        raise RuntimeError("--webhook-secret is required with --api-key (to verify the webhook)")
    with httpx.Client(base_url=base, timeout=30.0) as client, \
            WebhookReceiver(host=receiver_host) as receiver:
        # Ready first: the stack migrates the database before its API answers, so the demo
        # tenant can only be written once /readyz says so.
        _wait_ready(client, wait_ready_s)
        if api_key is None:
            api_key, webhook_secret = _demo_tenant(settings)
            log.info("demo tenant created in %s", settings.masked_dump()["database_url"])
        assert webhook_secret is not None
        client.headers["authorization"] = f"Bearer {api_key}"
        product = product_image()
        (out / "product.png").write_bytes(product)
        file_id = _check(client.post("/v1/files", files={"file": ("product.png", product, "image/png")}),
                         "upload")["id"]
        params = {"num_timesteps": steps or DEMO_STEPS}
        items = [{"prompt": scene, "seed": 1000 + i, "think": i == 0, "params": params}
                 for i, scene in enumerate(SCENES)]
        submitted = time.perf_counter()
        batch = _check(client.post("/v1/batches", json={
            "task": "tryon", "product_file": file_id, "items": items, "webhook_url": receiver.url,
            "metadata": {"source": "bagel-jobs demo"}}, headers={"idempotency-key": f"demo-{time.time_ns()}"}),
            "submit batch")
        batch_id = batch["id"]
        log.info("batch %s submitted: %d jobs", batch_id, len(items))
        bar = tqdm(total=100, desc=f"batch {batch_id[:8]}", unit="%", file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total} {unit} [{elapsed}]")
        while True:
            state = _check(client.get(f"/v1/batches/{batch_id}"), "batch status")
            bar.n = round(100 * float(state.get("progress", 0.0)), 1)
            bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(state.get("counts", {}).items()) if v))
            bar.refresh()
            if state.get("completed_at"):
                break
            time.sleep(POLL_S)
        bar.n = 100
        bar.close()
        batch_seconds = time.perf_counter() - submitted
        verified = False
        webhook_error = None
        try:
            hook = receiver.wait_for("batch.completed", timeout_s=WEBHOOK_WAIT_S)[0]
            standardwebhooks.Webhook(webhook_secret).verify(hook.body, hook.headers)
            verified = True
        except Exception as exc:  # noqa: BLE001 - reported in summary.json, not fatal
            webhook_error = f"{type(exc).__name__}: {exc}"
            log.error("webhook not verified: %s", webhook_error)
        jobs = _jobs_of(client, batch_id)
        summary_jobs = []
        for job in sorted(jobs, key=lambda j: j.get("position", 0)):
            result = job.get("result") or {}
            entry = {"id": job.get("id"), "position": job.get("position"), "status": job.get("status"),
                     "prompt": job.get("prompt"), "think": job.get("think"), "attempts": job.get("attempts"),
                     "think_text": result.get("think_text"), "error": job.get("error"),
                     "timings": job.get("timings")}
            url = result.get("url")
            if job.get("status") == "succeeded" and url:
                r = client.get(url) if url.startswith("/") else httpx.get(url, timeout=30.0)
                r.raise_for_status()
                name = f"scene-{job.get('position', 0)}.png"
                (out / name).write_bytes(r.content)
                entry["output_file"] = name
            summary_jobs.append(entry)
    ok = verified and all(j["status"] == "succeeded" for j in summary_jobs) and len(summary_jobs) == len(SCENES)
    summary = {"batch_id": batch_id, "api_url": base, "product_file_id": file_id,
               "jobs": summary_jobs, "webhook_verified": verified, "webhook_error": webhook_error,
               "batch_seconds": round(batch_seconds, 3), "demo_seconds": round(time.perf_counter() - started, 3),
               "ok": ok}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("demo %s in %.1f s: %d job(s), webhook_verified=%s, results in %s", "succeeded" if ok else "FAILED",
             summary["demo_seconds"], len(summary_jobs), verified, out)
    return 0 if ok else 1
