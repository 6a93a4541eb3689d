"""Request body limits against a real API process on both stacks, over raw sockets: a declared
Content-Length over the limit is a 413 before any body is sent; a chunked body is cut off where
it passes the limit and the connection is closed; the 413 is the JSON error naming the field
and the limit; nothing is stored; an upload at the byte limit still goes through.

The API runs with ``max_upload_bytes`` 4,096 (request limit 4,096 + 65,536 = 69,632 bytes) and
``max_batch_items`` 2 (batch limit 2 × 68,480 + 65,536 = 202,496; other routes 134,016), so the
tests move little data."""

from __future__ import annotations

import http.client
import io
import json
import random
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.fixtures.worker import Proc, Stack
from worker import tenants
from worker.models import Batch, File, Job
from worker.storage import make_store

MAX_UPLOAD_BYTES = 4096
UPLOAD_LIMIT = 69_632
BATCH_LIMIT = 202_496
DECLARED = 60 * 1024 * 1024  # what the client claims it will send, never sends
DEADLINE_S = 30.0  # generous: each wait is for a response that should come at once
CHUNK = 8 * 1024
BOUNDARY = "b0undary"
UPLOAD_LIMIT_REASON = "for uploads (the 4,096 byte upload limit plus 65,536 bytes of multipart framing)"


@dataclass
class Server:
    stack: Stack
    proc: Proc
    host: str
    port: int
    key: str

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=DEADLINE_S)

    def head(self, path: str, content_type: str, length: int | None) -> bytes:
        """Request line and headers of a POST: ``Content-Length`` when given, else chunked."""
        framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.key}\r\n"
                f"Content-Type: {content_type}\r\n{framing}\r\n\r\n").encode()


@pytest.fixture
def server(stack: Stack) -> Iterator[Server]:
    """The API as a real process with small limits, and a tenant's API key."""
    # One API process: the stack's SIGKILL at the test's end then frees the port for the next test.
    proc = stack.start("api", extra_env={"BAGEL_JOBS_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
                                         "BAGEL_JOBS_MAX_BATCH_ITEMS": "2", "BAGEL_JOBS_API_WORKERS": "1"})
    with stack.session() as session:
        tenant = tenants.create_tenant(session, "acme")
        _, key = tenants.create_api_key(session, tenant.id, "tests")
    url = urlsplit(stack.api_url())
    yield Server(stack, proc, url.hostname or "127.0.0.1", url.port or 80, key)
    assert "Traceback" not in proc.log()


def read_response(sock: socket.socket) -> tuple[http.client.HTTPResponse, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response, json.loads(response.read())


def is_closed_by_server(sock: socket.socket) -> bool:
    """After the response: the server's end is gone (end of stream or a reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def keep_sending(sock: socket.socket, sent: int, up_to: int) -> int:
    """Send more chunks until the connection breaks or ``up_to`` body bytes went; returns the total."""
    filler = b"\xab" * CHUNK
    try:
        while sent < up_to:
            send_chunk(sock, filler)
            sent += CHUNK
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def stored(stack: Stack) -> tuple[int, int, int, list[str]]:
    """(file rows, job rows, batch rows, stored input objects)."""
    with stack.session() as session:
        counts = [session.scalar(select(func.count()).select_from(model)) for model in (File, Job, Batch)]
    return counts[0], counts[1], counts[2], sorted(o.key for o in make_store(stack.settings).list_objects("inputs/"))


def png_of(size_bytes: int, seed: int) -> bytes:
    """A valid PNG of exactly ``size_bytes``: noisy pixels, padded by a private ancillary chunk."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (16, 16), random.Random(seed).randbytes(16 * 16 * 3)).save(buf, format="PNG")
    base = buf.getvalue()
    pad = b"\0" * (size_bytes - len(base) - 12)
    chunk = struct.pack(">I", len(pad)) + b"zzPd" + pad + struct.pack(">I", zlib.crc32(b"zzPd" + pad))
    return base[:33] + chunk + base[33:]  # right after the 33-byte signature and IHDR


def multipart_parts(data: bytes) -> tuple[bytes, bytes]:
    """The multipart framing around one ``file`` part: (before the data, after it)."""
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode(), f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_declared_upload_over_the_limit_is_refused_before_its_body_is_sent(server):
    with server.connect() as sock:
        sock.sendall(server.head("/v1/files", f"multipart/form-data; boundary={BOUNDARY}", DECLARED))
        response, body = read_response(sock)  # only the headers were sent: no body is awaited
        assert response.status == 413 and response.getheader("Connection") == "close"
        assert body["error"] == {
            "code": "payload_too_large", "field": "file",
            "message": f"file: a request of 62,914,560 bytes exceeds the 69,632 byte limit {UPLOAD_LIMIT_REASON}"}
        assert is_closed_by_server(sock)
    assert stored(server.stack) == (0, 0, 0, [])


def test_a_chunked_upload_is_cut_off_at_the_limit_and_the_connection_closed(server):
    before, _ = multipart_parts(b"")
    with server.connect() as sock:
        sock.sendall(server.head("/v1/files", f"multipart/form-data; boundary={BOUNDARY}", None))
        send_chunk(sock, before)
        sent = keep_sending(sock, len(before), UPLOAD_LIMIT + 1)  # one chunk past the limit, then wait
        assert sent <= UPLOAD_LIMIT + CHUNK
        response, body = read_response(sock)
        assert response.status == 413 and response.getheader("Connection") == "close"
        assert body["error"] == {
            "code": "payload_too_large", "field": "file",
            "message": f"file: the request body exceeds the 69,632 byte limit {UPLOAD_LIMIT_REASON}"}
        # The client would go on to 60 MB; the server reads no more and the connection breaks
        # once the kernel's socket buffers are full (a few MB on loopback, however busy the server).
        sent = keep_sending(sock, sent, DECLARED)
        assert sent < DECLARED // 4
    assert stored(server.stack) == (0, 0, 0, [])


def test_a_declared_json_body_over_the_limit_is_refused_naming_the_body(server):
    with server.connect() as sock:
        sock.sendall(server.head("/v1/jobs", "application/json", DECLARED))
        response, body = read_response(sock)
        assert response.status == 413 and response.getheader("Connection") == "close"
        assert body["error"] == {
            "code": "payload_too_large", "field": "body",
            "message": "body: a request of 62,914,560 bytes exceeds the 134,016 byte limit for this route"}
        assert is_closed_by_server(sock)
    assert stored(server.stack) == (0, 0, 0, [])


def test_a_chunked_batch_is_cut_off_at_the_batch_limit(server):
    with server.connect() as sock:
        sock.sendall(server.head("/v1/batches", "application/json", None))
        opening = b'{"task": "generate", "items": [{"prompt": "'
        send_chunk(sock, opening)
        sent = keep_sending(sock, len(opening), BATCH_LIMIT + 1)
        response, body = read_response(sock)
        assert response.status == 413
        assert body["error"] == {
            "code": "payload_too_large", "field": "body",
            "message": "body: the request body exceeds the 202,496 byte limit for a batch of up to 2 items"}
        assert keep_sending(sock, sent, DECLARED) < DECLARED // 4  # cut off (see the upload case)
    assert stored(server.stack) == (0, 0, 0, [])


def test_uploads_at_the_byte_limit_still_go_through(server):
    # With a Content-Length (httpx) ...
    declared = png_of(MAX_UPLOAD_BYTES, seed=1)
    r = httpx.post(f"{server.stack.api_url()}/v1/files", headers={"Authorization": f"Bearer {server.key}"},
                   files={"file": ("x.png", declared, "image/png")}, timeout=DEADLINE_S)
    assert r.status_code == 201, r.text
    assert r.json()["size_bytes"] == MAX_UPLOAD_BYTES
    # ... and chunked, the data split across chunks.
    chunked = png_of(MAX_UPLOAD_BYTES, seed=2)
    before, after = multipart_parts(chunked)
    with server.connect() as sock:
        sock.sendall(server.head("/v1/files", f"multipart/form-data; boundary={BOUNDARY}", None))
        for piece in (before, chunked[:1000], chunked[1000:], after):
            send_chunk(sock, piece)
        sock.sendall(b"0\r\n\r\n")
        response, body = read_response(sock)
    assert response.status == 201, body
    assert body["size_bytes"] == MAX_UPLOAD_BYTES
    files, jobs, batches, objects = stored(server.stack)
    assert (files, jobs, batches, len(objects)) == (2, 0, 0, 2)
