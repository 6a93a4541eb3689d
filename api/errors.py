"""The one map from error types to HTTP status codes, and the JSON error body.

Owns: turning every ``worker.errors.ServiceError``, FastAPI's request validation errors and
HTTP errors into ``{"error": {"code", "message", "field"}}`` with a 4xx status the client can
act on. Anything unexpected is a 500 with code ``internal_error`` and no details (logged with
its traceback) — bad input never lands there because it is validated first.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from worker import errors

log = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status.
STATUS_BY_ERROR: tuple[tuple[type[errors.ServiceError], int], ...] = (
    (errors.PayloadTooLarge, 413),
    (errors.ImageTooLarge, 413),
    (errors.BatchTooLarge, 413),
    (errors.UnsupportedImageFormat, 415),
    (errors.InvalidInput, 422),
    (errors.Unauthorized, 401),
    (errors.NotFound, 404),
    (errors.ObjectNotFound, 404),
    (errors.SignatureInvalid, 403),
    (errors.IdempotencyConflict, 409),
    (errors.DeliveryPending, 409),
    (errors.AdapterInUse, 409),
    (errors.ProvenanceNotRecorded, 409),
    (errors.GpuBudgetExhausted, 403),
    (errors.LimitExceeded, 429),
    (errors.TransientError, 503),
)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_input", 429: "too_many_requests"}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def status_for(exc: errors.ServiceError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def _field_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or None


def _limit_of(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    for key, text in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("max_length", "at most"),
                      ("min_length", "at least")):
        if key in ctx:
            unit = " items/characters" if "length" in key else ""
            return f" (limit: {text} {ctx[key]}{unit})"
    return ""


def _json_error_message(err: dict[str, Any], document: Any) -> str:
    """``body: invalid JSON at line L, column C: <parser message>``. FastAPI puts the character
    offset last in ``loc`` and the parser's message in ``ctx.error``; the document gives line and
    column (counted from 1, as Python's ``json`` does)."""
    loc = err.get("loc") or ()
    position = loc[-1] if loc and isinstance(loc[-1], int) else None
    reason = (err.get("ctx") or {}).get("error") or err.get("msg", "invalid")
    if position is None:
        return f"body: invalid JSON: {reason}"
    if isinstance(document, bytes | bytearray):
        document = document.decode("utf-8", "replace")
    if not isinstance(document, str):
        return f"body: invalid JSON at character {position}: {reason}"
    line = document.count("\n", 0, position) + 1
    column = position - document.rfind("\n", 0, position)
    return f"body: invalid JSON at line {line}, column {column}: {reason}"


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's 405 names only the first route's
    (``/v1/jobs`` has a GET route and a POST route). Each method is tried against the routes."""
    routes = request.app.router.routes
    return [method for method in _METHODS
            if any(route.matches(dict(request.scope, method=method))[0] == Match.FULL for route in routes)]


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(errors.ServiceError)
    async def _service_error(_request: Request, exc: errors.ServiceError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.warning("request failed: %s: %s", exc.code, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, errors.LimitExceeded) and exc.retry_after_s is not None:
            headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("invalid_input", _json_error_message(first, exc.body), "body"),
                                status_code=422)
        field = _field_of(tuple(first.get("loc", ())))
        value = first.get("input")
        shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r:.80})"
        message = f"{field or 'body'}: {first.get('msg', 'invalid')}{_limit_of(first)}{shown}"
        more = len(exc.errors()) - 1
        if more:
            message += f"; and {more} more problem(s)"
        return JSONResponse(error_body("invalid_input", message, field), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {"Allow": ", ".join(_allowed_methods(request))}
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    @app.exception_handler(OperationalError)
    async def _database_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc).splitlines()[0])
        return JSONResponse(error_body("database_unavailable", "the database is unavailable; retry later"),
                            status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal error; the request was not completed"),
                            status_code=500)
