"""``/v1/objects/{key}``: downloads from local storage through signed, expiring URLs.

Owns: serving an object when the URL's HMAC signature and expiry check out (the URL is the
credential, as with an S3 presigned URL). With S3 storage clients get presigned S3 URLs and
this route answers 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from api.contract import ID_PATTERN, errors
from api.deps import StoreDep
from worker.errors import NotFound
from worker.storage import LocalStore, content_type_for

router = APIRouter(prefix="/v1/objects", tags=["results"])
BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.get("/{key:path}", response_class=Response, summary="Download a result or input",
            responses={200: {"content": {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY},
                             "description": "the file"}, **errors(403, 404, 422, 503)})
def download_object(key: Annotated[str, Path(description="the object's storage key, as in the signed URL",
                                             json_schema_extra={"pattern": ID_PATTERN})],
                    store: StoreDep,
                    expires: Annotated[int, Query(ge=0, description="Unix seconds after which the URL is refused")],
                    sig: Annotated[str, Query(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$",
                                              description="the URL's HMAC-SHA256, hex")]) -> Response:
    """Serve a file of local storage to whoever holds its signed, expiring URL (the URL is the
    credential; no API key). Result URLs in jobs, manifests and webhooks point here when the
    service keeps files locally; with S3 they are presigned S3 URLs and this route is a 404."""
    if not isinstance(store, LocalStore):
        raise NotFound("key: downloads are served by the S3 store's presigned URLs", field="key")
    store.verify(key, expires, sig)
    return Response(store.get(key), media_type=content_type_for(key),
                    headers={"Cache-Control": "private, max-age=60"})
