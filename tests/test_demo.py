"""``bagel-jobs up`` + ``bagel-jobs demo`` on a fresh folder with no settings at all: the
embedded stack (SQLite, server-less broker, local storage, tiny checkpoint generated on first
use) runs a real try-on batch through its HTTP API (the demo is an SDK client) and a signed
webhook, and the demo ends by printing a gallery link that serves the page with every image."""

from __future__ import annotations

import html
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image

from tests.fixtures.worker import ROOT, free_port


def test_up_then_demo_writes_images_and_a_verified_summary(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_JOBS_")}
    env.update(PYTHONPATH=str(ROOT), BAGEL_JOBS_API_PORT=str(port), BAGEL_JOBS_WEBHOOK_ALLOW_PRIVATE="true",
               BAGEL_JOBS_PUBLIC_BASE_URL=f"http://127.0.0.1:{port}")
    log = (tmp_path / "stack.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up"], cwd=tmp_path, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        demo = subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--steps", "2", "--wait-ready-s", "180",
                               "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
        stack_log = (tmp_path / "stack.log").read_text()
        assert demo.returncode == 0, demo.stderr[-3000:] + stack_log[-3000:]
        # The last line on stdout is the gallery link; it serves the page while the stack runs.
        gallery_url = demo.stdout.strip().splitlines()[-1].removeprefix("gallery: ")
        assert gallery_url.startswith(f"http://127.0.0.1:{port}/batches/") and "?token=" in gallery_url
        page = httpx.get(gallery_url, timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        images = [html.unescape(src) for src in re.findall(r'<img class="result"[^>]* src="([^"]+)"', page.text)]
        assert len(images) == 4 and 'id="product-image"' in page.text
        for src in images:
            assert Image.open(io.BytesIO(httpx.get(src, timeout=30).raise_for_status().content)).format == "PNG"
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        log.close()
    assert code == 0
    stack_log = (tmp_path / "stack.log").read_text()
    assert "tiny RANDOM" in stack_log and "embedded stack stopped" in stack_log
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["webhook_verified"] is True and summary["ok"] is True
    assert summary["gallery_url"] == gallery_url
    assert [j["status"] for j in summary["jobs"]] == ["succeeded"] * 4
    assert summary["jobs"][0]["think"] is True and summary["jobs"][0]["think_text"]
    for job in summary["jobs"]:
        assert Image.open(tmp_path / "out" / job["output_file"]).format == "PNG"
        assert job["timings"]["model_seconds"] > 0
