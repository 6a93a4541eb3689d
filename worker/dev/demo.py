"""``bagel-jobs demo``: a real try-on batch through the HTTP API of a running stack, with the SDK.

Owns: the demo client. It waits for ``/readyz``, gets a tenant (creates one in the configured
database unless ``--api-key`` is given), draws a product picture (a mug, so no asset ships in
the repo), and then uses the Python SDK (``bagel_client.Client``) as a customer would: uploads
the picture, submits one try-on batch of four scene prompts (think on the first), waits with a
progress bar until the batch completes, verifies the ``batch.completed`` webhook that reached a
local receiver (``bagel_client.verify_webhook``), downloads the images and writes them with
``summary.json`` to the output folder, and ends by printing a share link to the batch's gallery
page (``share_batch``) on stdout. Talks to the service only over HTTP (plus the one-time tenant
creation).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from PIL import Image, ImageDraw

from bagel_client import BatchItem, Client, verify_webhook
from bagel_client.progress_bar import ProgressBar
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


def _wait_ready(base_url: str, timeout_s: float) -> None:
    """Until ``/readyz`` answers 200 (the SDK covers the API's ``/v1`` routes, not the probes)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=5.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"the API at {base_url} was not ready within {timeout_s:.0f} s ({last})")


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


def run_demo(settings: Settings, *, api_url: str | None, out_dir: str | Path, wait_ready_s: float,
             api_key: str | None = None, webhook_secret: str | None = None, steps: int | None = None,
             receiver_host: str = "127.0.0.1") -> int:
    """Run the demo; returns 0 when every job succeeded and the webhook verified."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = (api_url or settings.public_base_url).rstrip("/")
    if api_key is not None and not webhook_secret:
        raise RuntimeError("--webhook-secret is required with --api-key (to verify the webhook)")
    # Ready first: the stack migrates the database before its API answers, so the demo tenant
    # can only be written once /readyz says so.
    _wait_ready(base, wait_ready_s)
    if api_key is None:
        api_key, webhook_secret = _demo_tenant(settings)
        log.info("demo tenant created in %s", settings.masked_dump()["database_url"])
    assert webhook_secret is not None
    with Client(base, api_key) as client, WebhookReceiver(host=receiver_host) as receiver:
        product = product_image()
        (out / "product.png").write_bytes(product)
        product_file = client.upload(product, filename="product.png")
        items = [BatchItem(prompt=scene, seed=1000 + i, think=i == 0) for i, scene in enumerate(SCENES)]
        submitted = time.perf_counter()
        batch = client.tryon(product_file, items, params={"num_timesteps": steps or DEMO_STEPS},
                             webhook_url=receiver.url, metadata={"source": "bagel-jobs demo"})
        log.info("batch %s submitted: %d jobs", batch.id, batch.job_count)
        bar = ProgressBar(f"batch {batch.id[:8]}")
        try:
            batch = client.wait(batch, progress=bar, poll_s=POLL_S, max_poll_s=POLL_S)
        finally:
            bar.close()
        batch_seconds = time.perf_counter() - submitted
        verified = False
        webhook_error = None
        try:
            hook = receiver.wait_for("batch.completed", timeout_s=WEBHOOK_WAIT_S)[0]
            verify_webhook(webhook_secret, hook.headers, hook.body)
            verified = True
        except Exception as exc:  # noqa: BLE001 - reported in summary.json, not fatal
            webhook_error = f"{type(exc).__name__}: {exc}"
            log.error("webhook not verified: %s", webhook_error)
        summary_jobs = []
        for job in client.batch_jobs(batch):
            entry = {"id": job.id, "position": job.position, "status": job.status, "prompt": job.prompt,
                     "think": job.think, "attempts": job.attempts,
                     "think_text": job.result.think_text if job.result else None,
                     "error": job.raw.get("error"), "timings": job.raw.get("timings")}
            if job.status == "succeeded":
                name = f"scene-{job.position}.png"
                client.download(job, out / name)
                entry["output_file"] = name
            summary_jobs.append(entry)
        gallery = client.share_batch(batch)
    ok = verified and all(j["status"] == "succeeded" for j in summary_jobs) and len(summary_jobs) == len(SCENES)
    summary = {"batch_id": batch.id, "api_url": base, "product_file_id": product_file.id,
               "jobs": summary_jobs, "webhook_verified": verified, "webhook_error": webhook_error,
               "gallery_url": gallery.url, "gallery_expires_at": gallery.expires_at.isoformat(),
               "batch_seconds": round(batch_seconds, 3), "demo_seconds": round(time.perf_counter() - started, 3),
               "ok": ok}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("demo %s in %.1f s: %d job(s), webhook_verified=%s, results in %s", "succeeded" if ok else "FAILED",
             summary["demo_seconds"], len(summary_jobs), verified, out)
    # The last line on stdout: the page to open (the log lines go to stderr).
    sys.stdout.write(f"gallery: {gallery.url}\n")
    sys.stdout.flush()
    return 0 if ok else 1
