"""POST/GET /v1/files on both stacks: uploads stored content-addressed; bad images refused
with a 4xx naming the problem and NOTHING stored; auth and tenant isolation."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from PIL import Image


def encode(fmt: str, size: tuple[int, int] = (48, 32)) -> bytes:
    """Noisy pixels, so the compressed data is large and truncation cuts into it."""
    buf = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3)).save(buf, format=fmt)
    return buf.getvalue()


def bomb_header(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


@pytest.mark.parametrize(("fmt", "content_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                                   ("WEBP", "image/webp")])
def test_upload_stores_the_image_content_addressed(api_stack, fmt, content_type):
    data = encode(fmt)
    r = api_stack.client.post("/v1/files", headers=api_stack.auth(), files={"file": ("p.bin", data, "x/y")})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["format"], body["content_type"], body["width"], body["height"]) == (fmt, content_type, 48, 32)
    assert body["size_bytes"] == len(data) and body["filename"] == "p.bin"
    assert api_stack.stored_objects() == [f"inputs/{api_stack.tenant_id}/{body['sha256']}"]
    again = api_stack.client.post("/v1/files", headers=api_stack.auth(), files={"file": ("q.bin", data, "x/y")})
    assert again.status_code == 201 and again.json()["id"] == body["id"]
    assert api_stack.row_counts()["files"] == 1
    got = api_stack.client.get(f"/v1/files/{body['id']}", headers=api_stack.auth())
    assert got.status_code == 200 and got.json()["sha256"] == body["sha256"]


def test_other_tenants_cannot_see_a_file(api_stack):
    file_id = api_stack.upload_png()
    r = api_stack.client.get(f"/v1/files/{file_id}", headers=api_stack.auth(api_stack.other_key))
    assert r.status_code == 404
    assert r.json()["error"] == {"code": "not_found", "message": f"file_id: file {file_id!r} not found",
                                 "field": "file_id"}
    # The same bytes uploaded by the other tenant are a separate file under its own prefix.
    other_id = api_stack.upload_png(key=api_stack.other_key)
    assert other_id != file_id
    assert sum(k.startswith(f"inputs/{api_stack.other_tenant_id}/") for k in api_stack.stored_objects()) == 1


@pytest.mark.parametrize(("data", "status", "code", "message"), [
    (b"GIF89a" + b"\x00" * 64, 415, "unsupported_image_format", "file: GIF images are not accepted"),
    (b"this is not an image, just text", 422, "invalid_image", "file: not a PNG, JPEG or WebP image"),
    (encode("PNG", (64, 64))[:3000], 422, "invalid_image", "file: truncated or corrupt PNG image"),
    (encode("JPEG", (64, 64))[:2000], 422, "invalid_image", "file: truncated or corrupt JPEG image"),
    (bomb_header(9000, 9000), 413, "image_too_large", "file: 9000x9000 px exceeds the 8192 px per side limit"),
    (bomb_header(8000, 6000), 413, "image_too_large",
     "file: 8000x6000 px = 48,000,000 pixels exceeds the 40,000,000 pixel limit"),
    (b"", 422, "invalid_image", "file: the upload is empty (0 bytes)"),
], ids=["gif", "garbage", "truncated-png", "truncated-jpeg", "too-wide", "too-many-pixels", "empty"])
def test_bad_images_are_refused_and_nothing_is_stored(api_stack, data, status, code, message):
    before = api_stack.snapshot()
    r = api_stack.client.post("/v1/files", headers=api_stack.auth(), files={"file": ("x.png", data, "image/png")})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["field"] == "file" and error["message"].startswith(message)
    assert api_stack.snapshot() == before


def raw_upload(stack, filename: bytes, data: bytes):
    """A multipart upload with the filename's bytes as sent (httpx would percent-encode a NUL)."""
    boundary = b"b0undary"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n--" + boundary + b"--\r\n")
    return stack.client.post("/v1/files", content=body, headers={
        **stack.auth(), "Content-Type": f"multipart/form-data; boundary={boundary.decode()}"})


def test_control_characters_are_removed_from_the_filename_before_storing(api_stack):
    r = raw_upload(api_stack, b"shoe\x00\x01.png" + b"x" * 300, encode("PNG"))
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == ("shoe.png" + "x" * 300)[:255]
    assert api_stack.row_counts()["files"] == 1  # one object, one row: nothing orphaned
    assert api_stack.stored_objects() == [f"inputs/{api_stack.tenant_id}/{r.json()['sha256']}"]
    only_controls = raw_upload(api_stack, b"\x00\x1f", encode("JPEG"))
    assert only_controls.status_code == 201 and only_controls.json()["filename"] is None
    assert api_stack.row_counts()["files"] == len(api_stack.stored_objects()) == 2


def test_byte_limit_is_enforced(api_stack, make_settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    small = api_stack.settings.model_copy(update={"max_upload_bytes": 2048})
    data = encode("PNG", (30, 30)) + b"\0" * 1024  # ~3.7 KB: under the Content-Length shortcut
    with TestClient(create_app(small)) as client:
        before = api_stack.snapshot()
        r = client.post("/v1/files", headers=api_stack.auth(), files={"file": ("x.png", data, "image/png")})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"
        assert "exceeds the 2,048 byte limit" in r.json()["error"]["message"]
        big = b"\0" * 200_000
        r = client.post("/v1/files", headers=api_stack.auth(), files={"file": ("x.png", big, "image/png")})
        assert r.status_code == 413 and "upload limit" in r.json()["error"]["message"]
        assert api_stack.snapshot() == before


def test_missing_file_field_is_a_422_naming_it(api_stack):
    r = api_stack.client.post("/v1/files", headers=api_stack.auth(), data={"other": "x"})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "file" and r.json()["error"]["code"] == "invalid_input"


def test_auth_is_required_and_checked(api_stack):
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer bj_not-a-real-key"},
                    {"Authorization": "Bearer " + "x" * 300}):
        r = api_stack.client.post("/v1/files", headers=headers, files={"file": ("x.png", encode("PNG"), "image/png")})
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert api_stack.stored_objects() == []


def test_revoked_keys_stop_working(api_stack):
    from worker import tenants

    with api_stack.session() as session:
        key_row, plaintext = tenants.create_api_key(session, api_stack.tenant_id, "temp")
    assert api_stack.client.get("/v1/files/nope", headers=api_stack.auth(plaintext)).status_code == 404
    with api_stack.session() as session:
        assert tenants.revoke_api_key(session, key_row.id)
    assert api_stack.client.get("/v1/files/nope", headers=api_stack.auth(plaintext)).status_code == 401
