"""``/v1/objects/{key}``: downloads from local storage through signed, expiring URLs.

Owns: serving an object when the URL's HMAC signature and expiry check out (the URL is the
credential, as with an S3 presigned URL). With S3 storage clients get presigned S3 URLs and
this route answers 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.deps import StoreDep
from worker.errors import NotFound
from worker.storage import LocalStore, content_type_for

router = APIRouter(prefix="/v1/objects", tags=["results"])


@router.get("/{key:path}", response_class=Response,
            responses={200: {"content": {"image/png": {}, "text/plain": {}}}, 403: {"description": "bad signature"}})
def download(key: str, store: StoreDep, expires: Annotated[int, Query(ge=0)],
             sig: Annotated[str, Query(min_length=64, max_length=64)]) -> Response:
    if not isinstance(store, LocalStore):
        raise NotFound("key: downloads are served by the S3 store's presigned URLs", field="key")
    store.verify(key, expires, sig)
    return Response(store.get(key), media_type=content_type_for(key),
                    headers={"Cache-Control": "private, max-age=60"})
