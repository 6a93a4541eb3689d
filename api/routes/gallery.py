"""A batch's gallery for a browser, behind a share link: ``POST /v1/batches/{id}/share`` makes the
link (API key), and the link's token is the only credential of ``GET /batches/{id}`` (the HTML
page), ``GET /batches/{id}/data`` (the JSON it polls: counts and a page of manifest entries)
and ``GET /batches/{id}/download.zip`` (every succeeded result and the manifest).

A refused link is a 403: an HTML page saying whether it expired or is invalid for the page, the
JSON error (``share_link_expired``, ``share_link_invalid``) for the data and the zip. A genuine
link whose batch is gone is a 404. The three browser routes are not in the OpenAPI document.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from api import batch_zip, gallery, share
from api.contract import AUTHED, errors, id_path
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.manifest import manifest_page
from api.schemas import Manifest
from api.share import ShareIn, ShareOut
from worker import progress, queries
from worker.errors import NotFound, ShareLinkExpired, SignatureInvalid
from worker.models import Batch
from worker.settings import Settings
from worker.storage import ResultStore

router = APIRouter()
TRYON = "tryon"
BATCH_ID = id_path("batch", "b2")


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"batch_id: batch {batch_id!r} not found", field="batch_id")


@router.post("/v1/batches/{batch_id}/share", status_code=201, response_model=ShareOut, tags=["batches"],
             operation_id="share_batch", summary="Create a share link to the batch's gallery page",
             responses=errors(*AUTHED, 400, 404, 413, 422))
def share_batch(batch_id: Annotated[str, BATCH_ID], tenant: TenantDep, session: SessionDep, settings: SettingsDep,
                body: Annotated[ShareIn, Body(default_factory=ShareIn)]) -> ShareOut:
    """A signed link to the batch's gallery page — the product image, every result with its
    prompt, status, think text and timings, live progress while the batch runs, and a zip of
    all results — for anyone holding it, without an API key, until `expires_at`
    (`expires_in_s`: 60 s to 30 days, default 7 days). Nothing is stored: make as many as you
    like; a link cannot be revoked on its own."""
    if queries.get_batch(session, tenant.id, batch_id) is None:
        raise _not_found(batch_id)
    expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=body.expires_in_s)
    token = share.sign(share.share_key(settings), tenant.id, batch_id, int(expires_at.timestamp()))
    url = f"{settings.public_base_url.rstrip('/')}/batches/{quote(batch_id, safe='')}?{urlencode({'token': token})}"
    return ShareOut(url=url, expires_at=expires_at)


def _shared_batch(session: Session, settings: Settings, batch_id: str, token: str | None) -> tuple[Batch, int]:
    """The batch the token opens and the token's expiry; ``ShareLinkInvalid``/``ShareLinkExpired``
    (403) or ``NotFound`` (404)."""
    grant = share.verify(share.share_key(settings), token, batch_id)
    batch = queries.get_batch(session, grant.tenant_id, batch_id)
    if batch is None:
        raise _not_found(batch_id)
    return batch, grant.expires_at


def _product_url(session: Session, batch: Batch, store: ResultStore, settings: Settings) -> tuple[str | None, str]:
    """The first job's first input image (a try-on batch's product: every job shares it)."""
    first = progress.manifest_jobs(session, batch.id, limit=1)
    file_ids = first[0].input_file_ids if first else []
    label = "Product" if first and first[0].task == TRYON else "Input"
    row = queries.get_file(session, batch.tenant_id, file_ids[0]) if file_ids else None
    return (store.url(row.storage_key, settings.presign_expiry_s) if row else None), label


@router.get("/batches/{batch_id}", include_in_schema=False, response_class=HTMLResponse)
def gallery_page(batch_id: str, session: SessionDep, settings: SettingsDep, store: StoreDep,
                 token: str | None = None, page: Annotated[int, Query(ge=1)] = 1) -> HTMLResponse:
    nonce = gallery.new_nonce()
    try:
        batch, expires_at = _shared_batch(session, settings, batch_id, token)
    except SignatureInvalid as exc:
        title = "This gallery link has expired" if isinstance(exc, ShareLinkExpired) else "This gallery link is invalid"
        return HTMLResponse(gallery.render_message(title, exc.message, nonce), status_code=403,
                            headers=gallery.page_headers(nonce))
    except NotFound as exc:
        return HTMLResponse(gallery.render_message("Batch not found", exc.message, nonce), status_code=404,
                            headers=gallery.page_headers(nonce))
    page = min(page, gallery.page_count(batch.job_count))  # past the end: the last page
    start = (page - 1) * gallery.PAGE_CARDS
    body = manifest_page(session, batch, store, settings, since=None, cursor=str(start), limit=gallery.PAGE_CARDS)
    product_url, label = _product_url(session, batch, store, settings)
    assert token is not None  # verified above
    text = gallery.render_page(body, links=gallery.PageLinks.for_batch(batch.id, token), nonce=nonce, page=page,
                               product_url=product_url, product_label=label,
                               expires_text=share.expiry_text(expires_at))
    return HTMLResponse(text, headers=gallery.page_headers(nonce, [gallery.store_origin(store)]))


@router.get("/batches/{batch_id}/data", include_in_schema=False, response_model=Manifest)
def gallery_data(batch_id: str, response: Response, session: SessionDep, settings: SettingsDep, store: StoreDep,
                 token: str | None = None, cursor: Annotated[int, Query(ge=0)] = 0,
                 limit: Annotated[int, Query(ge=1, le=gallery.PAGE_CARDS)] = gallery.PAGE_CARDS) -> Manifest:
    """What the page polls: the counts and up to one page of entries from ``cursor`` (a position)."""
    batch, _ = _shared_batch(session, settings, batch_id, token)
    response.headers.update(gallery.NO_STORE)
    return manifest_page(session, batch, store, settings, since=None, cursor=str(cursor), limit=limit)


@router.get("/batches/{batch_id}/download.zip", include_in_schema=False, response_class=StreamingResponse)
def gallery_zip(batch_id: str, request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep,
                token: str | None = None) -> StreamingResponse:
    batch, _ = _shared_batch(session, settings, batch_id, token)
    session.commit()  # the archive reads its rows in short transactions of its own
    chunks = batch_zip.zip_chunks(request.app.state.sessions, batch.id, store, settings)
    return StreamingResponse(chunks, media_type=batch_zip.MEDIA_TYPE, headers={
        **gallery.NO_STORE, "content-disposition": f'attachment; filename="batch-{batch.id}.zip"'})
