"""The OpenAPI document as the API's contract: the one error body, the status codes each route
declares, named operation ids and the shared parameter rules.

Owns: ``ErrorBody`` (what every 4xx and 503 carries: ``{"error": {"code", "message", "field"}}``,
also in place of FastAPI's own 422 schema), ``errors(…)`` (the ``responses=`` of a route: each
status with its meaning and headers), the status sets routes share, the operation id of a route
(its function's name), and the printable-text pattern that path ids, cursors and header values
follow (the server refuses control characters; the schema says so, so a generated client and a
fuzzer know it). Leaves the bodies to ``api.schemas`` and the webhook events to ``api.events``;
``tests/test_openapi.py`` checks the document against these rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Header, Path, Query
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from worker.settings import Settings

# What ``worker.params.check_text`` refuses, as patterns: no C0 control character (U+0000-U+001F)
# in ids, cursors and keys; none but tab, newline and carriage return in free text. Stated in the
# schema only (``json_schema_extra``): the server's own check gives the clearer message.
ID_PATTERN = r"^[^\u0000-\u001f]+$"
_C0_BUT_WHITESPACE = r"\u0000-\u0008\u000b\u000c\u000e-\u001f"
TEXT_PATTERN = rf"^[^{_C0_BUT_WHITESPACE}]*$"
PROMPT_PATTERN = rf"^[^{_C0_BUT_WHITESPACE}]*[^\s{_C0_BUT_WHITESPACE}][^{_C0_BUT_WHITESPACE}]*$"  # not blank
MAX_IDEMPOTENCY_KEY_CHARS = 255


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, stable across releases: e.g. `invalid_input`, "
                      "`invalid_parameter`, `unknown_file`, `invalid_image`, `unsupported_image_format`, "
                      "`payload_too_large`, `image_too_large`, `batch_too_large`, `invalid_webhook_url`, "
                      "`address_not_allowed`, `unauthorized`, `not_found`, `object_not_found`, "
                      "`signature_invalid`, `share_link_invalid`, `share_link_expired`, `idempotency_conflict`, "
                      "`delivery_pending`, `provenance_not_recorded`, `rate_limited`, `too_many_waiting`, `gpu_budget_exhausted`, `database_unavailable`, "
                      "`storage_unavailable`, `broker_unavailable`, `method_not_allowed`",
                      examples=["invalid_parameter"])
    message: str = Field(description="for a person: names the field, the limit and what was sent",
                         examples=["params.num_timesteps: Input should be less than or equal to 200 (limit: <= 200)"])
    field: str | None = Field(description="the request field at fault, dotted with [index] for list items "
                              "(`items[3].prompt`); null when no single field is", examples=["params.num_timesteps"])


class ErrorBody(BaseModel):
    """The body of every error response."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "code": "not_found", "message": "job_id: job 'job_x' not found", "field": "job_id"}}]})

    error: ErrorDetail = Field(description="what went wrong")


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                                "schema": {"type": "integer", "minimum": 0}}}
_MEANING: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("a body that cannot be parsed at all (bytes that are not text, a broken multipart form)", {}),
    401: ("no API key, or one that is unknown or revoked (`Authorization: Bearer <key>`)",
          {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}),
    403: ("refused: a bad or expired signature, or the tenant's monthly GPU budget is spent", {}),
    404: ("not found among this tenant's resources", {}),
    409: ("conflict: the Idempotency-Key was used for a different request, the delivery is still pending, or "
          "the job's provenance is not recorded yet", {}),
    413: ("too large: the body (413 before it is read when Content-Length says so), an image's bytes or "
           "pixels, or a batch's item count", {}),
    415: ("not a PNG, JPEG or WebP image", {}),
    422: ("invalid input: the error names the field and the limit; nothing was stored or queued", {}),
    429: ("a tenant limit: requests per minute or waiting jobs; retry after `Retry-After` seconds", _RETRY_AFTER),
    503: ("a dependency (database, object storage or broker) is unavailable; nothing was half-done, retry", {}),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for ``statuses``: each with ``ErrorBody``, its meaning and headers."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _MEANING[status]
        out[status] = {"model": ErrorBody, "description": description, **({"headers": headers} if headers else {})}
    return out


# Status sets, by what a route does. Every authenticated route reads the database.
AUTHED = (401, 503)
READ = (*AUTHED, 422)  # a list: its query parameters
READ_ONE = (*AUTHED, 404, 422)  # a resource by id: unknown id, or a control character in it
WITH_BODY = (*AUTHED, 400, 409, 413, 422)  # a POST with a body and an Idempotency-Key
CREATE = (*WITH_BODY, 429, 403)  # a job or batch: the tenant's limits too
ACT_ON = (*READ_ONE, 409)  # a POST on a resource by id: idempotent replay, pending conflict


def operation_id(route: APIRoute) -> str:
    """A route's operation id is its function's name (``create_job``), so generated clients get
    stable, readable method names."""
    return route.name


def id_path(what: str, example: str) -> Any:
    """The path parameter naming one of the tenant's ``what``."""
    return Path(min_length=1, json_schema_extra={"pattern": ID_PATTERN}, description=f"the {what}'s id",
                examples=[example])


IdempotencyKey = Annotated[str | None, Header(
    json_schema_extra={"minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS, "pattern": ID_PATTERN},
    description="makes a retry safe: the same key with the same request returns the first response (for 24 h) "
                "instead of acting twice; the same key with a different request is a 409",
    examples=["order-1234-tryon"])]


TAGS = [
    {"name": "files", "description": "Input images: upload once, refer to them by id."},
    {"name": "adapters", "description": "LoRA adapters (PEFT format) that jobs can run with."},
    {"name": "jobs", "description": "One generation, edit, try-on or question."},
    {"name": "batches", "description": "Many jobs at once (a product and its scenes), their manifest and cancel."},
    {"name": "sessions", "description": "Turns that see the earlier turns: a character kept across pictures."},
    {"name": "usage", "description": "Jobs, images and GPU-seconds per day."},
    {"name": "webhooks", "description": "The delivery log, replay and a test ping; the events are under `webhooks`."},
    {"name": "results", "description": "Result and input files behind signed, expiring URLs."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics (no API key)."},
]
_SIDE_MODELS = ("JobIn", "BatchIn", "BatchItemIn")
_ID = "$response.body#/id"
# OpenAPI links: where the id a creating call returns can go next (generated clients and
# stateful fuzzers follow them).
LINKS: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
    "upload_file": {"GetFile": ("get_file", {"file_id": _ID})},
    "upload_adapter": {"GetAdapter": ("get_adapter", {"adapter_id": _ID}),
                       "DeleteAdapter": ("delete_adapter", {"adapter_id": _ID})},
    "create_job": {"GetJob": ("get_job", {"job_id": _ID}), "CancelJob": ("cancel_job", {"job_id": _ID}),
                   "GetProvenance": ("get_provenance", {"job_id": _ID}), "RerunJob": ("rerun_job", {"job_id": _ID})},
    "create_batch": {"GetBatch": ("get_batch", {"batch_id": _ID}),
                     "ListBatchJobs": ("list_batch_jobs", {"batch_id": _ID}),
                     "GetManifest": ("get_manifest", {"batch_id": _ID}),
                     "CancelBatch": ("cancel_batch", {"batch_id": _ID})},
    "create_session": {"GetSession": ("get_session", {"session_id": _ID}),
                       "AddTurn": ("add_turn", {"session_id": _ID}),
                       "DeleteSession": ("delete_session", {"session_id": _ID})},
    "add_turn": {"GetTurnJob": ("get_job", {"job_id": _ID})},
    "send_test_webhook": {"GetDelivery": ("get_delivery", {"delivery_id": _ID}),
                          "ReplayDelivery": ("replay_delivery", {"delivery_id": _ID})},
}
_STRING_KEYWORDS = ("pattern", "minLength", "maxLength")
_NUMBER_KEYWORDS = ("multipleOf", "minimum", "maximum")


def _into_branches(node: Any) -> None:
    """Move string and number keywords that sit beside an ``anyOf`` (an optional field's
    ``json_schema_extra``) into the branch of that type, where every generator reads them."""
    if isinstance(node, list):
        for item in node:
            _into_branches(item)
        return
    if not isinstance(node, dict):
        return
    if "anyOf" in node:
        for keywords, types in ((_STRING_KEYWORDS, ("string",)), (_NUMBER_KEYWORDS, ("integer", "number"))):
            moved = {k: node.pop(k) for k in keywords if k in node}
            for branch in node["anyOf"]:
                if moved and branch.get("type") in types:
                    branch.update(moved)
    for value in node.values():
        _into_branches(value)


def _models(base: type[BaseModel] = BaseModel) -> Iterator[type[BaseModel]]:
    for model in base.__subclasses__():
        yield model
        yield from _models(model)


def _restore_examples(document: dict[str, Any]) -> None:
    """Each component's examples as its model declares them: FastAPI drops every null from the
    document (``exclude_none``), nulls inside examples too, which leaves required fields out."""
    schemas = document["components"]["schemas"]
    for model in _models():
        extra = model.model_config.get("json_schema_extra")
        if model.__module__.startswith("api.") and isinstance(extra, dict) and model.__name__ in schemas:
            schemas[model.__name__]["examples"] = extra["examples"]


def _binary_parts(document: dict[str, Any]) -> None:
    """A file part of a multipart body is also ``format: binary``: FastAPI writes only OpenAPI
    3.1's ``contentMediaType``, which client generators read as a plain string field."""
    for schema in document["components"]["schemas"].values():
        for prop in schema.get("properties", {}).values():
            if prop.get("contentMediaType") == "application/octet-stream":
                prop["format"] = "binary"


def _add_links(document: dict[str, Any]) -> None:
    operations = {op["operationId"]: op for item in document["paths"].values() for op in item.values()}
    for source, links in LINKS.items():
        response = next(r for status, r in operations[source]["responses"].items() if status.startswith("2"))
        response["links"] = {name: {"operationId": target, "parameters": parameters,
                                    "description": f"the created resource's id for {target}"}
                             for name, (target, parameters) in links.items()}


def finish_document(app: FastAPI, settings: Settings) -> None:
    """Finish the document once, on its first request: the limits that are settings (the largest
    output side, the batch size), keywords moved into the branch they describe, and links."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document["components"]["schemas"]
        for name in _SIDE_MODELS:
            for side in ("width", "height"):
                for option in schemas[name]["properties"][side].get("anyOf", []):
                    if option.get("type") == "integer":
                        option["maximum"] = settings.max_output_side_px
        schemas["BatchIn"]["properties"]["items"]["maxItems"] = settings.max_batch_items
        _into_branches(document)
        _add_links(document)
        _restore_examples(document)
        _binary_parts(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _iso_time(value: Any) -> Any:
    """A time given as bare Unix seconds is refused: the parameter is an ISO 8601 date-time, as
    the schema says (pydantic would otherwise read ``0.5`` as a timestamp)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9.]+(e[+-]?[0-9]+)?\s*", value, re.IGNORECASE):
        raise ValueError("an ISO 8601 date-time like 2026-11-28T12:00:00Z, not a number")
    return value


Time = Annotated[datetime, BeforeValidator(_iso_time)]

# Query parameters the list routes share.
CURSOR = Query(max_length=200, json_schema_extra={"pattern": r"^[A-Za-z0-9_=-]+$"},
               description="the next_cursor of the previous page (opaque)")
AFTER = Query(description="only those created after this time (exclusive), ISO 8601")
BEFORE = Query(description="only those created before this time (exclusive), ISO 8601")
BATCH_FILTER = Query(min_length=1, max_length=64, json_schema_extra={"pattern": ID_PATTERN},
                     description="only this batch's")
CancelAfter = Annotated[str | None, Header(
    json_schema_extra={"pattern": r"^([0-9]{1,9}|([0-9]{1,9}[smhdSMHD])+)$"}, examples=["1h"],
    description="a deadline like deadline_s, in Replicate's style: plain seconds or whole units (90s, 5m, 1h30m, "
                "2d), 1 s to 30 days; the smaller of the two wins")]
