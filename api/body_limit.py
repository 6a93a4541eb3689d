"""Request body limits, enforced while the body streams in.

Owns: the byte limit of each route's request body (``BodyLimits``) and the pure ASGI middleware
that holds every HTTP request to it (``BodyLimitMiddleware``). A ``Content-Length`` over the
limit is answered at once, before a byte of the body is read (and before a ``100 Continue``);
a body without one (chunked) is counted as it arrives and cut off where it passes the limit.
Either way the answer is the API's JSON error, a 413 ``payload_too_large`` naming the field
(``file`` for uploads, ``body`` for JSON) and the limit in bytes, sent with ``Connection:
close``: the server reads no more of that request and closes the connection.

Limits, in bytes:
- ``POST /v1/files``: ``max_upload_bytes`` plus 64 KiB of multipart framing (boundaries, part
  headers, a long filename);
- ``POST /v1/batches``: 68,480 per item for ``max_batch_items`` items (a full-length prompt
  with every character escaped as ``\\uXXXX``: 6 × 8,000, full metadata: 16 KiB, and 4 KiB for
  ids and parameters) plus 64 KiB for the batch's own fields: 17,596,416 with the defaults;
- any other request: one item's room plus 64 KiB, 134,016 bytes.

Leaves the checks of what the body holds to the routes: the image's own byte, pixel and format
limits (``worker.images``), the item count (``max_batch_items``) and field limits
(``api.schemas``). Starlette's ``max_body_size`` is not used: its 413 names neither the field
nor the limit, and it answers only once the app starts reading the body.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body, status_for
from worker.errors import PayloadTooLarge
from worker.params import MAX_METADATA_BYTES, MAX_PROMPT_CHARS
from worker.settings import Settings

MULTIPART_OVERHEAD_BYTES = 64 * 1024
ADAPTER_CONFIG_BYTES = 64 * 1024  # adapter_config.json
# Room for one job's JSON: 6 bytes per prompt character is the longest form of a character of the
# Basic Multilingual Plane (escaped as \uXXXX; UTF-8 takes at most 4), plus full metadata and 4 KiB
# for file ids, sizes and parameters.
JSON_ITEM_BYTES = 6 * MAX_PROMPT_CHARS + MAX_METADATA_BYTES + 4 * 1024
JSON_ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes one request's body may have, the field a 413 names, and what the limit is
    for (said in the message)."""

    max_bytes: int
    field: str
    purpose: str

    def message(self, declared_bytes: int | None) -> str:
        size = "the request body" if declared_bytes is None else f"a request of {declared_bytes:,} bytes"
        return f"{self.field}: {size} exceeds the {self.max_bytes:,} byte limit {self.purpose}"


@dataclass(frozen=True)
class BodyLimits:
    """Each route's ``BodyLimit``; ``other`` covers every request not listed in ``by_route``."""

    by_route: dict[tuple[str, str], BodyLimit]
    other: BodyLimit

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        upload = BodyLimit(settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES, "file",
                           f"for uploads (the {settings.max_upload_bytes:,} byte upload limit plus "
                           f"{MULTIPART_OVERHEAD_BYTES:,} bytes of multipart framing)")
        batch = BodyLimit(settings.max_batch_items * JSON_ITEM_BYTES + JSON_ENVELOPE_BYTES, "body",
                          f"for a batch of up to {settings.max_batch_items:,} items")
        adapter = BodyLimit(settings.max_adapter_bytes + ADAPTER_CONFIG_BYTES + MULTIPART_OVERHEAD_BYTES, "weights",
                            f"for adapters (the {settings.max_adapter_bytes:,} byte adapter limit plus its config "
                            "and multipart framing)")
        return cls(by_route={("POST", "/v1/files"): upload, ("POST", "/v1/batches"): batch,
                             ("POST", "/v1/adapters"): adapter},
                   other=BodyLimit(JSON_ITEM_BYTES + JSON_ENVELOPE_BYTES, "body", "for this route"))

    def for_request(self, method: str, path: str) -> BodyLimit:
        return self.by_route.get((method, path.rstrip("/")), self.other)


class BodyLimitMiddleware:
    """Pure ASGI middleware: refuses a request whose body passes its route's limit, from the
    declared ``Content-Length`` when there is one, else while counting the body as it arrives."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_request(scope["method"], scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit.max_bytes:
            await _refuse(scope, receive, send, limit, declared)
            return
        received = 0
        is_cut_off = False  # the body passed the limit: the app gets a disconnect, not more bytes
        has_app_responded = False  # the app began its own response, so no 413 can go out

        async def receive_within_limit() -> Message:
            nonlocal received, is_cut_off
            if is_cut_off:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    is_cut_off = True
                    if not has_app_responded:
                        await _refuse(scope, receive, send, limit, None)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal has_app_responded
            if is_cut_off and not has_app_responded:
                return  # the 413 went out instead: drop the app's answer to the cut-off body
            has_app_responded = has_app_responded or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, receive_within_limit, send_unless_refused)


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: BodyLimit, declared: int | None) -> None:
    error = PayloadTooLarge(limit.message(declared), field=limit.field)
    response = JSONResponse(error_body(error.code, error.message, error.field), status_code=status_for(error),
                            headers={"Connection": "close"})
    await response(scope, receive, send)
