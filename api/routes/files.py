"""``/v1/files``: upload an input image (multipart), read its metadata.

Owns: reading the upload within the byte limit (``api.body_limit`` holds the whole request to
its limit while it streams in, before parsing), validating it (``worker.images``), storing it
content-addressed (``inputs/{tenant}/{sha256}``) and recording it. The same content uploaded
twice is one file.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from api import idempotency
from api.contract import READ_ONE, WITH_BODY, IdempotencyKey, errors, id_path
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.schemas import FileOut
from worker import faults, jobs, queries
from worker.errors import NotFound
from worker.images import inspect_image
from worker.storage import input_key

router = APIRouter(prefix="/v1/files", tags=["files"])
MAX_FILENAME_CHARS = 255
ROUTE = "POST /v1/files"
_CONTROL_CHARS = dict.fromkeys([*range(0x20), 0x7F])


def clean_filename(filename: str | None) -> str | None:
    """The client's filename as recorded: control characters removed (Postgres cannot store NUL,
    and none belongs in a name), cut to 255 characters; None when nothing is left. Done before
    the image is stored, so no refusal can follow the object write."""
    cleaned = (filename or "").translate(_CONTROL_CHARS)[:MAX_FILENAME_CHARS]
    return cleaned or None


IMAGE_TYPES = "image/png, image/jpeg, image/webp"


@router.post("", status_code=201, response_model=FileOut, responses=errors(*WITH_BODY, 415),
             summary="Upload an input image",
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {
                 "encoding": {"file": {"contentType": IMAGE_TYPES}}}}}})
def upload_file(tenant: TenantDep, session: SessionDep, settings: SettingsDep, store: StoreDep,
                file: Annotated[UploadFile, File(description="a PNG, JPEG or WebP image, at most the "
                                                 "max_upload_bytes, max_image_pixels and max_image_side_px settings")],
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Store an image for jobs to use (201 with its id). The same bytes uploaded again return
    the same file. Checked as it arrives: format, size in bytes and pixels, EXIF orientation."""
    key = idempotency.check_key(idempotency_key)
    # One byte past the limit is enough for inspect_image to refuse the file: the request limit
    # leaves room for multipart framing, so the part itself may still be a little too long.
    data = file.file.read(settings.max_upload_bytes + 1)
    filename = clean_filename(file.filename)
    digest = idempotency.fingerprint(data + b"\0" + (filename or "").encode())
    if (previous := idempotency.replay(session, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    info = inspect_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels,
                         max_side_px=settings.max_image_side_px)
    storage_key = input_key(tenant.id, info.sha256)
    existing = queries.files_by_sha256(session, tenant.id, info.sha256)
    if existing is None or not store.exists(storage_key):
        store.put(storage_key, data, info.content_type)
        faults.after_object_write(settings.fault_injection, storage_key)
    try:
        row = jobs.add_file(session, tenant.id, sha256=info.sha256, storage_key=storage_key,
                            content_type=info.content_type, fmt=info.format, width=info.width,
                            height=info.height, size_bytes=info.size_bytes,
                            filename=filename, commit=False)
    except IntegrityError:  # the same content uploaded concurrently: use the winner's row
        session.rollback()
        row = queries.files_by_sha256(session, tenant.id, info.sha256)
        assert row is not None
    body = FileOut.model_validate(row, from_attributes=True).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(session, tenant.id, key, ROUTE, digest, 201, body)) is not None:
        return winner
    return JSONResponse(body, status_code=201)


@router.get("/{file_id}", response_model=FileOut, responses=errors(*READ_ONE), summary="Get a file's metadata")
def get_file(file_id: Annotated[str, id_path("file", "f_1")], tenant: TenantDep, session: SessionDep) -> FileOut:
    """An uploaded image's id, size, format and checksum."""
    row = queries.get_file(session, tenant.id, file_id)
    if row is None:
        raise NotFound(f"file_id: file {file_id!r} not found", field="file_id")
    return FileOut.model_validate(row, from_attributes=True)
