"""The batch gallery page: server-rendered HTML with a small script that keeps it live.

Owns: the page — the batch's status, counts and progress bar, the product (or input) image,
a grid of result cards (image, prompt, status, think text, error, timings), a pager of
``PAGE_CARDS`` cards, the "Download all (zip)" link — the script that polls the page's JSON
(``…/data``) every ``POLL_MS`` while the batch is active and updates the counters and the
page's cards in place, the page shown for a refused or unknown link, and the response headers
of all of them. Leaves the links to ``api.share``, the entries and counts to ``api.manifest``
and the routes to ``api.routes.gallery``.

Every value on the page is escaped with ``html.escape`` (prompts are user input); the script
writes text with ``textContent`` only. The HTML, CSS and script are string constants here, so
the package ships them without package data. The Content-Security-Policy allows exactly what
the page uses: its own script and style (by a per-response nonce), images from the API and
from the result store's origin, and fetches to the API; ``Referrer-Policy: no-referrer``
keeps the token in the page's URL from leaking to the image host.

Cost per poll: the batch's counts (one grouped count) and the entries from the first
unfinished card of the page to the page's end, at most ``PAGE_CARDS`` — the same whatever the
batch's size. Polling stops once the batch completes.
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel

from api.schemas import Manifest, ManifestEntry
from worker.storage import ResultStore

PAGE_CARDS = 100
POLL_MS = 1500
# A key of the layout whose URL shows the store's origin (minting a URL reads nothing).
ORIGIN_PROBE_KEY = "results/gallery/origin.png"
NO_STORE = {"cache-control": "no-store", "referrer-policy": "no-referrer", "x-content-type-options": "nosniff"}

CSS = """
:root { font-family: system-ui, sans-serif; color: #1d1d1f; background: #f5f5f2; }
body { margin: 0 auto; max-width: 1200px; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.3rem; margin: .5rem 0; } h1 code { font-size: 1rem; color: #555; }
h2 { font-size: 1rem; margin: 1rem 0 .5rem; }
[hidden] { display: none !important; }
#summary { margin: .25rem 0; } #status { font-weight: 600; } #live { color: #777; font-size: .85rem; }
progress { width: 100%; height: .8rem; }
#product img { width: 200px; height: 200px; object-fit: contain; border-radius: 6px; background: #fff; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 1rem; }
.card { background: #fff; border-radius: 8px; padding: .75rem; box-shadow: 0 1px 3px rgba(0,0,0,.12); }
.frame { aspect-ratio: 1; background: #eceae4; border-radius: 6px; display: grid; place-items: center; }
.frame img { width: 100%; height: 100%; object-fit: contain; border-radius: 6px; }
.meta { display: flex; justify-content: space-between; font-size: .85rem; margin: .5rem 0 .25rem; }
.status { font-weight: 600; }
.card[data-status=succeeded] .status { color: #11772d; } .card[data-status=failed] .status { color: #b3261e; }
.card[data-status=running] .status { color: #8a5a00; }
.prompt { margin: .25rem 0; white-space: pre-wrap; word-break: break-word; }
.think pre { white-space: pre-wrap; word-break: break-word; font-size: .8rem; background: #f3f3ef; padding: .5rem; }
.error { color: #b3261e; font-size: .85rem; word-break: break-word; }
.timings { color: #666; font-size: .75rem; margin: .25rem 0 0; }
nav a { margin-right: 1rem; }
"""

# Updates the page in place: no reload, so a test can tell (window.galleryPolls counts polls).
SCRIPT = """
(() => {
  "use strict";
  const FINAL = new Set(["succeeded", "failed", "canceled", "expired"]);
  const body = document.body, byId = (id) => document.getElementById(id);
  const pageEnd = Number(body.dataset.pageEnd), pollMs = Number(body.dataset.pollMs);
  const clock = (iso) => (iso ? iso.slice(11, 19) + "Z" : "\\u2013");
  const seconds = (s) => (s == null ? "\\u2013" : s.toFixed(2) + " s");
  window.galleryPolls = 0;
  function show(el, text) { el.textContent = text; el.hidden = !text; }
  function update(card, e) {
    card.dataset.status = e.status;
    card.querySelector(".status").textContent = e.status;
    card.querySelector(".timings").textContent = `queued ${clock(e.queued_at)} \\u00b7 started ${clock(e.started_at)}` +
      ` \\u00b7 finished ${clock(e.finished_at)} \\u00b7 model ${seconds(e.model_seconds)}`;
    const think = card.querySelector(".think");
    think.querySelector("pre").textContent = e.think_text || "";
    think.hidden = !e.think_text;
    show(card.querySelector(".error"), e.error_code ? `${e.error_code}: ${e.error_message || ""}` : "");
    const img = card.querySelector("img.result");
    if (e.output_url && !img.getAttribute("src")) { img.src = e.output_url; img.hidden = false; }
  }
  function summarize(m) {
    byId("status").textContent = m.status;
    byId("status").dataset.status = m.status;
    byId("done").textContent = m.done;
    byId("progress").value = m.done;
    byId("counts").textContent = Object.entries(m.counts).filter(([, n]) => n).map(([s, n]) => `${s} ${n}`)
      .join(" \\u00b7 ");
  }
  async function poll() {
    const cards = [...document.querySelectorAll(".card")];
    const first = cards.find((c) => !FINAL.has(c.dataset.status)) || cards[cards.length - 1];
    const from = Number(first.dataset.position);
    const query = `&cursor=${from}&limit=${Math.max(1, pageEnd - from)}`;
    try {
      const r = await fetch(body.dataset.dataUrl + query, { cache: "no-store", credentials: "omit" });
      if (r.status === 403 || r.status === 404) { byId("live").textContent = "(link no longer valid)"; return; }
      if (r.ok) {
        const m = await r.json();
        window.galleryPolls += 1;
        summarize(m);
        for (const e of m.jobs) { const card = byId("job-" + e.job_id); if (card) update(card, e); }
        byId("live").textContent = m.status === "completed" ? "(complete)" : "(live)";
        if (m.status === "completed") return;
      }
    } catch (err) {
      byId("live").textContent = "(reconnecting\\u2026)";
    }
    setTimeout(poll, pollMs);
  }
  if (byId("status").dataset.status !== "completed" && document.querySelector(".card")) setTimeout(poll, pollMs);
})();
"""


@dataclass(frozen=True)
class PageLinks:
    """Where the page points, relative to ``/batches/<id>`` (so a path prefix in front of the
    API keeps working): its JSON, the zip, and the pager."""

    data: str
    zip: str
    token: str

    @classmethod
    def for_batch(cls, batch_id: str, token: str) -> PageLinks:
        query = urlencode({"token": token})
        base = quote(batch_id, safe="")
        return cls(data=f"{base}/data?{query}", zip=f"{base}/download.zip?{query}", token=token)

    def page(self, number: int) -> str:
        return "?" + urlencode({"token": self.token, "page": number})


def page_count(total: int) -> int:
    """Pages of ``PAGE_CARDS`` cards a batch of ``total`` jobs fills (at least one)."""
    return max(1, -(-total // PAGE_CARDS))


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


def store_origin(store: ResultStore) -> str:
    """``scheme://host[:port]`` the store's URLs point at (the API for local storage, the S3
    endpoint or bucket host for S3), for the page's ``img-src``."""
    parts = urlsplit(store.url(ORIGIN_PROBE_KEY, 60))
    return f"{parts.scheme}://{parts.netloc}"


def page_headers(nonce: str, image_origins: Iterable[str] = ()) -> dict[str, str]:
    """The page's security headers: a CSP for what it uses, no referrer, no caching."""
    images = " ".join(["'self'", *sorted(set(image_origins))])
    csp = (f"default-src 'none'; img-src {images}; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"content-security-policy": csp, **NO_STORE}


def _clock(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%H:%M:%SZ") if moment is not None else "\u2013"


def _seconds(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "\u2013"


def _counts_text(counts: Mapping[str, int] | BaseModel) -> str:
    """``succeeded 3 · running 1``: the statuses that have jobs, in the counts' order."""
    return " \u00b7 ".join(f"{status} {n}" for status, n in dict(counts).items() if n)


def _card(entry: ManifestEntry) -> str:
    e = html.escape
    src = f' src="{e(entry.output_url)}"' if entry.output_url else " hidden"
    error = f"{entry.error_code}: {entry.error_message or ''}" if entry.error_code else ""
    timings = (f"queued {_clock(entry.queued_at)} \u00b7 started {_clock(entry.started_at)} \u00b7 "
               f"finished {_clock(entry.finished_at)} \u00b7 model {_seconds(entry.model_seconds)}")
    return (
        f'<article class="card" id="job-{e(entry.job_id)}" data-job-id="{e(entry.job_id)}" '
        f'data-position="{entry.position}" data-status="{e(entry.status)}">'
        f'<div class="frame"><img class="result" alt="result {entry.position}" loading="lazy"{src}></div>'
        f'<p class="meta"><span class="position">#{entry.position} {e(entry.task)}</span>'
        f'<span class="status">{e(entry.status)}</span></p>'
        f'<p class="prompt">{e(entry.prompt)}</p>'
        f'<details class="think"{"" if entry.think_text else " hidden"}><summary>Think</summary>'
        f'<pre>{e(entry.think_text or "")}</pre></details>'
        f'<p class="error"{"" if error else " hidden"}>{e(error)}</p>'
        f'<p class="timings">{e(timings)}</p></article>'
    )


def _pager(links: PageLinks, page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    parts = []
    if page > 1:
        parts.append(f'<a href="{html.escape(links.page(page - 1))}" rel="prev">\u2190 previous</a>')
    parts.append(f"page {page} of {pages}")
    if page < pages:
        parts.append(f'<a href="{html.escape(links.page(page + 1))}" rel="next">next \u2192</a>')
    return f'<nav id="pager">{" ".join(parts)}</nav>'


def render_page(manifest: Manifest, *, links: PageLinks, nonce: str, page: int, product_url: str | None,
                product_label: str, expires_text: str) -> str:
    """The gallery page of ``manifest`` (one page of cards, the batch's counts): page ``page``
    of ``page_count(manifest.total)``."""
    e = html.escape
    pages = page_count(manifest.total)
    start = (page - 1) * PAGE_CARDS
    end = min(start + PAGE_CARDS, manifest.total)
    product = (f'<section id="product"><h2>{e(product_label)}</h2>'
               f'<img id="product-image" src="{e(product_url)}" alt="{e(product_label.lower())} image"></section>'
               if product_url else "")
    live = "(complete)" if manifest.status == "completed" else "(live)"
    cards = "".join(_card(entry) for entry in manifest.jobs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer"><title>Batch {e(manifest.batch_id)} · bagel-jobs</title>
<style nonce="{nonce}">{CSS}</style></head>
<body data-data-url="{e(links.data)}" data-page-end="{end}" data-poll-ms="{POLL_MS}">
<header><h1>Batch <code>{e(manifest.batch_id)}</code></h1>
<p id="summary"><span id="status" data-status="{e(manifest.status)}">{e(manifest.status)}</span> ·
<span id="done">{manifest.done}</span> of <span id="total">{manifest.total}</span> done ·
<span id="counts">{e(_counts_text(manifest.counts))}</span> <span id="live">{live}</span></p>
<progress id="progress" max="{manifest.total}" value="{manifest.done}"></progress>
<p><a id="download" href="{e(links.zip)}">Download all (zip)</a> — every succeeded result and manifest.csv ·
link valid until {e(expires_text)}</p></header>
{product}
<h2>Results {start + 1}–{end} of {manifest.total}</h2>
{_pager(links, page, pages)}
<main id="grid">{cards}</main>
<script nonce="{nonce}">{SCRIPT}</script>
</body></html>
"""


def render_message(title: str, message: str, nonce: str) -> str:
    """A page saying why the gallery cannot be shown (a refused link, an unknown batch)."""
    e = html.escape
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<title>{e(title)} · bagel-jobs</title><style nonce="{nonce}">{CSS}</style></head>
<body><h1 id="refused">{e(title)}</h1><p id="reason">{e(message)}</p></body></html>
"""
