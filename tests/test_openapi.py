"""The OpenAPI document is the contract (issue 11): checked on the document the app serves.

Covered: named operation ids; a summary, a description and a tag on every operation; every 4xx
and 503 answer documented with the one error body (FastAPI's own 422 schema gone); a description
on every parameter and every field; an example on every request and response body, and every
example valid against its own schema; enums for task, status, renorm type, priority and events;
the webhook events and their headers under ``webhooks``; the per-task input-image rule, text
patterns and setting-dependent limits in the schema; links from creating calls; a 405's
``Allow`` naming every method of the path. Real deliveries are validated against the webhook
schemas in the delivery tests (``tests/fixtures/contract.py``); the live API is fuzzed against
the document in ``test_openapi_fuzz.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.schemas import Event
from tests.fixtures.contract import document, schema_errors
from worker import outbox
from worker.models import JobStatus
from worker.settings import Settings

OPERATIONS = {
    "upload_file", "get_file", "upload_adapter", "list_adapters", "get_adapter", "delete_adapter", "create_job", "list_jobs", "get_job", "cancel_job", "get_provenance", "rerun_job", "create_batch", "list_batches",
    "get_batch", "list_batch_jobs", "get_manifest", "cancel_batch", "share_batch", "get_usage", "list_deliveries",
    "get_delivery", "replay_delivery", "send_test_webhook", "download_object", "healthz", "readyz", "metrics",
    "create_session", "get_session", "delete_session", "add_turn",
}
ERROR_REF = "#/components/schemas/ErrorBody"


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _properties(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from schema.get("properties", {}).items()


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return document()


def test_every_operation_has_a_named_id_summary_description_and_tag(spec: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in _operations(spec)]
    assert set(ids) == OPERATIONS and len(ids) == len(set(ids))
    for method, path, op in _operations(spec):
        assert op.get("summary") and op.get("description") and op.get("tags"), f"{method} {path}"
    declared = {tag["name"] for tag in spec["tags"]}
    assert {tag for _, _, op in _operations(spec) for tag in op["tags"]} <= declared


def test_every_error_answer_is_documented_with_the_one_error_body(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for method, path, op in _operations(spec):
        authenticated = bool(op.get("security"))
        statuses = set(op["responses"])
        if authenticated:
            assert {"401", "503"} <= statuses, f"{method} {path}"
        if "{" in path:
            assert "404" in statuses and "422" in statuses, f"{method} {path}"
        if op.get("requestBody"):
            assert {"400", "413", "422"} <= statuses, f"{method} {path}"
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and op["operationId"] != "readyz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, f"{method} {path} {status}"
                assert response["description"], f"{method} {path} {status}"
    limited = [op for _, _, op in _operations(spec) if op["operationId"] in ("create_job", "create_batch")]
    assert all("Retry-After" in op["responses"]["429"]["headers"] for op in limited)


def test_every_parameter_and_field_is_described(spec: dict[str, Any]) -> None:
    missing = [f"{method} {path} {p['name']}" for method, path, op in _operations(spec)
               for p in op.get("parameters", []) if not p.get("description")]
    missing += [f"{name}.{field}" for name, schema in spec["components"]["schemas"].items()
                for field, prop in _properties(schema) if not prop.get("description")]
    assert missing == []


def _json_bodies(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, schema) of every JSON request body and 2xx JSON response."""
    for method, path, op in _operations(spec):
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body:
            yield f"{method} {path} body", body["schema"]
        for status, response in op["responses"].items():
            content = response.get("content", {}).get("application/json")
            if status.startswith("2") and content and content.get("schema"):
                yield f"{method} {path} {status}", content["schema"]
    for event, item in spec["webhooks"].items():
        yield f"webhook {event}", item["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_every_body_has_an_example_that_its_schema_accepts(spec: dict[str, Any]) -> None:
    checked = 0
    for where, schema in _json_bodies(spec):
        target = _resolve(spec, schema)
        examples = target.get("examples") or []
        assert examples, f"{where}: no example"
        for example in examples:
            assert schema_errors(schema, example, spec) == [], where
            checked += 1
    assert checked >= 20


def test_enums_name_the_allowed_values(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert schemas["JobOut"]["properties"]["status"] == {"$ref": "#/components/schemas/JobStatus",
                                                         "description": schemas["JobOut"]["properties"]["status"]
                                                         ["description"]}
    assert set(schemas["JobIn"]["properties"]["task"]["enum"]) == {"generate", "edit", "understand", "tryon"}
    assert set(schemas["JobOut"]["properties"]["task"]["enum"]) == {"generate", "edit", "understand", "tryon"}
    renorm = schemas["GenerationParamsIn"]["properties"]["cfg_renorm_type"]["anyOf"][0]
    assert set(renorm["enum"]) == {"global", "channel", "text_channel"}
    assert get_args(Event) == outbox.EVENTS
    assert schemas["DeliveryOut"]["properties"]["event"]["enum"] == list(outbox.EVENTS)
    assert schemas["Priority"]["enum"] == ["interactive", "batch"]


def test_every_webhook_event_is_documented_with_its_signature_headers(spec: dict[str, Any]) -> None:
    assert list(spec["webhooks"]) == list(outbox.EVENTS)
    for event, item in spec["webhooks"].items():
        op = item["post"]
        headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
        assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}, event
        body = _resolve(spec, op["requestBody"]["content"]["application/json"]["schema"])
        assert body["properties"]["type"]["const"] == event
        assert "Standard Webhooks" in op["description"]


def test_the_schema_states_the_rules_the_server_enforces(spec: dict[str, Any]) -> None:
    job_in = {"$ref": "#/components/schemas/JobIn"}
    ok = {"task": "edit", "prompt": "make it red", "input_file_ids": ["f1"]}
    assert schema_errors(job_in, ok, spec) == []
    assert schema_errors(job_in, dict(ok, input_file_ids=[]), spec)  # an edit takes one input image
    assert schema_errors(job_in, dict(ok, task="generate"), spec)  # generate takes none
    assert schema_errors(job_in, dict(ok, task="understand", input_file_ids=["a", "b", "c"]), spec) == []
    assert schema_errors(job_in, dict(ok, prompt="  \n "), spec)  # blank
    assert schema_errors(job_in, dict(ok, prompt="red\u0001"), spec)  # a control character
    assert schema_errors(job_in, dict(ok, prompt="line one\nline two\ttab"), spec) == []
    assert schema_errors(job_in, {"task": "generate", "prompt": "a cat", "width": 520}, spec)  # not 16's multiple
    assert schema_errors(job_in, {"task": "generate", "prompt": "a cat", "webhook_url": "ftp://x/y"}, spec)
    upload = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(re.split(r",\s*", upload["encoding"]["file"]["contentType"])) == {"image/png", "image/jpeg",
                                                                                 "image/webp"}
    job_id = next(p for p in spec["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "job_id")
    assert re.fullmatch(job_id["schema"]["pattern"], "job-1") and not re.fullmatch(job_id["schema"]["pattern"],
                                                                                   "job\x00")


def test_limits_that_are_settings_are_stated_as_configured(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/db.sqlite", storage_dir=str(tmp_path),
                        max_output_side_px=768, max_batch_items=40)
    schemas = create_app(settings).openapi()["components"]["schemas"]
    width = next(o for o in schemas["JobIn"]["properties"]["width"]["anyOf"] if o.get("type") == "integer")
    assert width["maximum"] == 768 and width["multipleOf"] == 16
    assert schemas["BatchIn"]["properties"]["items"]["maxItems"] == 40


def test_creating_calls_link_to_what_reads_their_result(spec: dict[str, Any]) -> None:
    ids = {op["operationId"] for _, _, op in _operations(spec)}
    linked = {}
    for _, _, op in _operations(spec):
        for status, response in op["responses"].items():
            for link in response.get("links", {}).values():
                assert link["operationId"] in ids and status.startswith("2")
                linked.setdefault(op["operationId"], set()).add(link["operationId"])
    assert linked["create_batch"] >= {"get_batch", "get_manifest", "cancel_batch"}
    assert linked["create_job"] >= {"get_job", "cancel_job"} and linked["upload_file"] == {"get_file"}


def test_a_405_names_every_method_the_path_serves(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path}/db.sqlite", storage_dir=str(tmp_path))
    with TestClient(create_app(settings)) as client:
        r = client.request("OPTIONS", "/v1/jobs")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert client.delete("/v1/jobs/abc").headers["allow"] == "GET"
