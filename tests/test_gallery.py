"""The batch gallery page behind share links, in a real headless Chromium (Debian's ``chromium``
driven by Selenium through ``chromium-driver``; Selenium Manager is never asked for anything).

With real processes: the API, a GPU worker on the tiny checkpoint and the reconciler. The
browser tests run on the embedded stack only (SQLite, local storage: the page is the same on
every stack, and a browser run per stack would double the time); the plain HTTP ones on both.

Covered: the token (bound to its batch, tenant, expiry and key; malformed ones refused; an
expired one told apart); ``POST /v1/batches/{id}/share`` (201 with the link and its expiry,
through the SDK's sync and async clients too; 404 for another tenant's batch, 422 naming
``expires_in_s`` and its limit, 401 without a key); the page opened while a try-on batch is
still queued updates in place (no reload) until the batch completes, then shows every result
image decoded, the product image, the prompts (an HTML prompt shows as text and runs nothing)
and the think text, and a screenshot is written to ``var/test-artifacts/gallery.png``; its zip
holds every result (PNGs that decode) and manifest.csv; expired, tampered and another batch's
links are refused with a page that says which, and the JSON routes answer the error body; a
genuine link to a missing batch is a 404; a 250-job batch is paged (100 cards) and its JSON
capped; the headers.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from api import share
from bagel_client import AsyncClient, BatchItem, Client, Share
from tests.fixtures.services import require_service
from tests.fixtures.worker import ROOT, Stack, submit_jobs, wait_until
from worker import tenants
from worker.dev.demo import product_image
from worker.errors import ShareLinkExpired, ShareLinkInvalid
from worker.settings import Settings
from worker.storage import local_signing_key

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "var" / "test-artifacts" / "gallery.png"
SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
PRODUCT_PX = 64
STEPS = 2
WAIT_S = 240.0
HTTP_TIMEOUT_S = 60.0  # a loaded 2-core machine: the API may answer slowly, never a fixed sleep
PROMPTS = ["on a beach at sunset", '<img src=x onerror="window.pwned = 1"> on a marble counter',
           "in a snowy forest"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

STATE_JS = """return {status: document.getElementById("status").dataset.status, polls: window.galleryPolls,
  sentinel: window.sentinel || null, pwned: window.pwned || null,
  cards: [...document.querySelectorAll(".card")].map((c) => c.dataset.status)};"""
# Decoded: loaded and of a known width. Scrolled into view first: result images load lazily.
DECODED_JS = """return [...document.querySelectorAll(arguments[0])].map((img) => {
  img.scrollIntoView(); return img.complete && img.naturalWidth > 0; });"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium for the module, driven through the system's chromedriver."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        require_service("Chromium", f"{CHROMIUM} or {CHROMEDRIVER} is missing (`make services` installs Debian's "
                        "chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1024",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager is skipped (it would download a driver otherwise).
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _tenant(stack: Stack, name: str = "shop") -> tuple[str, str]:
    """(tenant id, API key) of a new tenant."""
    with stack.session() as s:
        tenant = tenants.create_tenant(s, f"{name}-{uuid.uuid4().hex[:6]}")
        _, key = tenants.create_api_key(s, tenant.id)
        return tenant.id, key


def _token(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def _link(stack: Stack, batch_id: str, token: str, what: str = "") -> str:
    return f"{stack.api_url()}/batches/{batch_id}{what}?token={token}"


def _state(driver: Any) -> dict[str, Any]:
    return driver.execute_script(STATE_JS)


def _decoded(driver: Any, selector: str) -> list[bool]:
    return driver.execute_script(DECODED_JS, selector)


def _png(data: bytes) -> tuple[int, int]:
    picture = Image.open(io.BytesIO(data))
    picture.load()
    assert picture.format == "PNG"
    return picture.size


def _close_to(moment: datetime, expected: datetime) -> bool:
    return abs((moment - expected).total_seconds()) < 60


# ---------------------------------------------------------------------------------------------
# The token, then the share link API


def test_a_token_opens_only_its_batch_of_its_tenant_until_it_expires(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, storage_dir=tmp_path / "storage", url_signing_key="k1")
    key, now = share.share_key(settings), time.time()
    expires = int(now) + 600
    token = share.sign(key, "t1", "b1", expires)
    assert share.verify(key, token, "b1", now) == share.Grant(tenant_id="t1", batch_id="b1", expires_at=expires)
    forged = [token.replace(f"{expires}.", f"{expires + 1}."), token.replace(".t1.", ".t2."),
              share.sign(local_signing_key(settings), "t1", "b1", expires),  # the download URLs' own key
              share.sign(share.share_key(settings.model_copy(update={"url_signing_key": SecretStr("k2")})),
                         "t1", "b1", expires)]
    for bad in forged:
        with pytest.raises(ShareLinkInvalid, match="altered, or made for another batch"):
            share.verify(key, bad, "b1", now)
    with pytest.raises(ShareLinkInvalid):
        share.verify(key, token, "b2", now)
    for malformed in (None, "", "x", f"{token}.", token.replace(".", "/")):
        with pytest.raises(ShareLinkInvalid, match="token"):
            share.verify(key, malformed, "b1", now)
    with pytest.raises(ShareLinkExpired, match=r"expired at .* UTC \(1 s ago\)"):
        share.verify(key, token, "b1", expires + 1)


def test_share_makes_an_expiring_link_and_refuses_strangers_and_bad_lifetimes(stack: Stack) -> None:
    stack.start("api")
    _, key = _tenant(stack)
    _, other_key = _tenant(stack, "other")
    with Client(stack.api_url(), key) as client:
        batch = client.submit_batch([{"prompt": "a red mug"}], task="generate", width=32, height=32)
        default = client.share_batch(batch)
    hour = httpx.post(f"{stack.api_url()}/v1/batches/{batch.id}/share", json={"expires_in_s": 3600},
                      headers={"authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT_S)

    async def async_share() -> Share:
        async with AsyncClient(stack.api_url(), key) as client:
            return await client.share_batch(batch.id, expires_in_s=60)

    minute = asyncio.run(async_share())
    now = datetime.now(UTC)
    assert isinstance(default, Share) and set(default.raw) == {"url", "expires_at"}
    assert default.url.startswith(f"{stack.api_url()}/batches/{batch.id}?token=")
    assert _close_to(default.expires_at, now + timedelta(days=7))
    assert hour.status_code == 201 and _close_to(datetime.fromisoformat(hour.json()["expires_at"]),
                                                 now + timedelta(hours=1))
    assert _close_to(minute.expires_at, now + timedelta(seconds=60))

    def post(body: Any, *, auth: str | None = key, batch_id: str = batch.id) -> httpx.Response:
        headers = {"authorization": f"Bearer {auth}"} if auth else {}
        return httpx.post(f"{stack.api_url()}/v1/batches/{batch_id}/share", json=body, headers=headers,
                          timeout=HTTP_TIMEOUT_S)

    too_short, too_long = post({"expires_in_s": 59}), post({"expires_in_s": 30 * 86400 + 1})
    assert too_short.status_code == too_long.status_code == 422
    assert too_short.json()["error"]["field"] == too_long.json()["error"]["field"] == "expires_in_s"
    assert too_short.json()["error"]["message"].startswith("expires_in_s: ")
    assert "(limit: >= 60)" in too_short.json()["error"]["message"]
    assert "(limit: <= 2592000)" in too_long.json()["error"]["message"]
    assert post({"expires_after": 60}).status_code == 422  # unknown fields are refused
    stranger = post({}, auth=other_key)
    assert stranger.status_code == 404
    assert stranger.json() == {"error": {"code": "not_found", "message": f"batch_id: batch {batch.id!r} not found",
                                         "field": "batch_id"}}
    assert post({}, batch_id="no-such-batch").status_code == 404
    anonymous = post({}, auth=None)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"

    page = httpx.get(default.url, timeout=HTTP_TIMEOUT_S)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp and "frame-ancestors 'none'" in csp
    images = stack.settings.s3_endpoint_url if stack.settings.storage_backend == "s3" else stack.api_url()
    assert "unsafe-inline" not in csp and f"img-src 'self' {images.rstrip('/')};" in csp
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["cache-control"] == "no-store"


# ---------------------------------------------------------------------------------------------
# The page in Chromium


@SQLITE_ONLY
def test_the_page_updates_in_place_until_every_result_decodes_and_its_zip_holds_them(stack: Stack, browser: Any
                                                                                    ) -> None:
    stack.start("api")  # no GPU worker yet: the page opens on a queued batch
    _, key = _tenant(stack)
    with Client(stack.api_url(), key) as client:
        items = [BatchItem(prompt=prompt, seed=i, think=i == 0) for i, prompt in enumerate(PROMPTS)]
        batch = client.tryon(product_image(PRODUCT_PX), items, params={"num_timesteps": STEPS,
                                                                        "max_think_tokens": 8})
        link = client.share_batch(batch)
    browser.get(link.url)
    first = _state(browser)
    assert first["status"] == "active" and first["cards"] == ["queued"] * len(PROMPTS)
    wait_until(lambda: all(_decoded(browser, "#product-image")), 30, 0.1, "the product image to decode")
    assert browser.execute_script("return document.getElementById('product-image').naturalWidth") == PRODUCT_PX
    browser.execute_script("window.sentinel = 'the first load'")  # gone if the page reloads

    for role in ("gpu", "reconciler"):
        stack.start(role)
    wait_until(lambda: _state(browser)["status"] == "completed", WAIT_S, 0.25, "the page to show the batch done")
    done = _state(browser)
    assert done["sentinel"] == "the first load" and done["polls"] >= 1  # updated in place, never reloaded
    assert done["cards"] == ["succeeded"] * len(PROMPTS)
    wait_until(lambda: (d := _decoded(browser, "img.result")) and all(d), 60, 0.2, "every result image to decode")
    assert len(_decoded(browser, "img.result")) == len(PROMPTS)
    sizes = browser.execute_script("return [...document.querySelectorAll('img.result')].map((i) => i.naturalWidth)")
    assert sizes == [PRODUCT_PX] * len(PROMPTS)

    texts = browser.execute_script("""return [...document.querySelectorAll(".card")].map((c) => ({
      prompt: c.querySelector(".prompt").textContent, think: c.querySelector(".think").hidden ? null :
      c.querySelector(".think pre").textContent, timings: c.querySelector(".timings").textContent}));""")
    assert [t["prompt"] for t in texts] == PROMPTS  # the HTML prompt is shown as text...
    assert done["pwned"] is None  # ...and ran nothing
    assert texts[0]["think"] and texts[1]["think"] is None and texts[2]["think"] is None
    assert all("finished" in t["timings"] and " s" in t["timings"].rsplit("model", 1)[1] for t in texts)
    assert browser.find_element("id", "counts").text == f"succeeded {len(PROMPTS)}"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.read_bytes().startswith(PNG_MAGIC)

    zip_url = browser.find_element("id", "download").get_attribute("href")
    assert zip_url == _link(stack, batch.id, _token(link.url), "/download.zip")
    response = httpx.get(zip_url, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    job_ids = batch.job_ids or []
    names = [f"{i:04d}-{job_id}.png" for i, job_id in enumerate(job_ids)]
    assert archive.namelist() == ["manifest.csv", *names]
    assert all(_png(archive.read(name)) == (PRODUCT_PX, PRODUCT_PX) for name in names)
    rows = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert [(r["job_id"], r["status"]) for r in rows] == [(j, "succeeded") for j in job_ids]


@SQLITE_ONLY
def test_expired_tampered_and_other_batch_links_are_refused_saying_which(stack: Stack, browser: Any) -> None:
    stack.start("api")
    tenant_id, key = _tenant(stack)
    with Client(stack.api_url(), key) as client:
        batch, other = (client.submit_batch([{"prompt": f"a mug {i}"}], task="generate", width=32, height=32)
                        for i in range(2))
        token, other_token = _token(client.share_batch(batch).url), _token(client.share_batch(other).url)
    signing_key = share.share_key(stack.settings)
    expired = share.sign(signing_key, tenant_id, batch.id, int(time.time()) - 60)
    flip = -10  # a character of the signature
    tampered = token[:flip] + ("A" if token[flip] != "A" else "B") + token[flip + 1:]
    refused = {"expired": (expired, "This gallery link has expired", "share_link_expired", "expired at"),
               "tampered": (tampered, "This gallery link is invalid", "share_link_invalid", "altered"),
               "another batch's": (other_token, "This gallery link is invalid", "share_link_invalid", "another batch"),
               "no token": ("", "This gallery link is invalid", "share_link_invalid", "has no token")}
    for case, (bad, title, code, reason) in refused.items():
        browser.get(_link(stack, batch.id, bad))
        assert browser.find_element("id", "refused").text == title, case
        assert reason in browser.find_element("id", "reason").text, case
        assert not browser.find_elements("css selector", ".card"), case
        page = httpx.get(_link(stack, batch.id, bad), timeout=HTTP_TIMEOUT_S)
        assert page.status_code == 403 and page.headers["referrer-policy"] == "no-referrer", case
        for what in ("/data", "/download.zip"):
            r = httpx.get(_link(stack, batch.id, bad, what), timeout=HTTP_TIMEOUT_S)
            assert r.status_code == 403, (case, what)
            assert r.json()["error"]["code"] == code and r.json()["error"]["field"] == "token", (case, what)
            assert reason in r.json()["error"]["message"], (case, what)

    # A genuine link to a batch that does not exist (or not the tenant's): 404.
    missing = str(uuid.uuid4())
    genuine = share.sign(signing_key, tenant_id, missing, int(time.time()) + 600)
    browser.get(_link(stack, missing, genuine))
    assert browser.find_element("id", "refused").text == "Batch not found"
    assert httpx.get(_link(stack, missing, genuine), timeout=HTTP_TIMEOUT_S).status_code == 404
    data = httpx.get(_link(stack, missing, genuine, "/data"), timeout=HTTP_TIMEOUT_S)
    assert data.status_code == 404 and data.json()["error"]["code"] == "not_found"
    # The genuine link still works, live: the batch has no worker, so it stays active.
    browser.get(_link(stack, batch.id, token))
    assert _state(browser)["cards"] == ["queued"]
    wait_until(lambda: (_state(browser)["polls"] or 0) >= 1, 30, 0.2, "the page to poll its data")


# ---------------------------------------------------------------------------------------------
# Large batches and escaping, over plain HTTP


def test_a_large_batch_is_paged_its_json_capped_and_its_prompts_escaped(stack: Stack) -> None:
    stack.start("api")
    submitted = submit_jobs(stack, 250, prompt='<script>window.pwned = 1</script> "quoted" & more')
    assert submitted.batch_id is not None
    with stack.session() as s:
        _, key = tenants.create_api_key(s, submitted.tenant_id)
    with Client(stack.api_url(), key) as client:
        token = _token(client.share_batch(submitted.batch_id).url)

    def page(number: int | None = None) -> str:
        extra = {} if number is None else {"page": number}
        r = httpx.get(f"{stack.api_url()}/batches/{submitted.batch_id}", params={"token": token, **extra},
                      timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200
        return r.text

    first, last, beyond = page(), page(3), page(9)
    cards = re.compile(r'<article class="card"')
    assert len(cards.findall(first)) == 100 and "page 1 of 3" in first and 'rel="next"' in first
    assert len(cards.findall(last)) == 50 and "page 3 of 3" in last and 'rel="next"' not in last
    assert len(cards.findall(beyond)) == 50 and "page 3 of 3" in beyond  # past the end: the last page
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt; &quot;quoted&quot; &amp; more 0" in first
    assert "<script>window.pwned" not in first

    def data(**params: Any) -> httpx.Response:
        return httpx.get(f"{stack.api_url()}/batches/{submitted.batch_id}/data", params={"token": token, **params},
                         timeout=HTTP_TIMEOUT_S)

    whole = data().json()
    assert len(whole["jobs"]) == 100 and whole["next_cursor"] == "100" and whole["total"] == 250
    assert whole["counts"]["queued"] == 250 and whole["status"] == "active"
    assert whole["jobs"][0]["prompt"] == '<script>window.pwned = 1</script> "quoted" & more 0'
    tail = data(cursor=200).json()
    assert [j["position"] for j in tail["jobs"]] == list(range(200, 250)) and tail["next_cursor"] is None
    capped = data(limit=101)
    assert capped.status_code == 422 and capped.json()["error"]["field"] == "limit"
    assert data().headers["cache-control"] == "no-store"
