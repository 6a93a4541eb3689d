"""Control characters in path and query parameters, on both stacks: a 422 naming the parameter,
never a 500 (Postgres refuses a NUL even in a lookup) and never a lookup that matches."""

from __future__ import annotations

import pytest

SIG = "0" * 64


@pytest.mark.parametrize(("method", "url", "field", "message"), [
    ("GET", "/v1/jobs/%00abc", "job_id", "job_id: contains the control character U+0000 at position 0"),
    ("GET", "/v1/jobs/a%1Fb", "job_id", "job_id: contains the control character U+001F at position 1"),
    ("POST", "/v1/jobs/%00abc/cancel", "job_id", "job_id: contains the control character U+0000 at position 0"),
    ("GET", "/v1/batches/%00", "batch_id", "batch_id: contains the control character U+0000 at position 0"),
    ("GET", "/v1/batches/b%00/jobs", "batch_id", "batch_id: contains the control character U+0000 at position 1"),
    ("POST", "/v1/batches/%00/cancel", "batch_id", "batch_id: contains the control character U+0000 at position 0"),
    ("GET", "/v1/files/%00", "file_id", "file_id: contains the control character U+0000 at position 0"),
    ("GET", f"/v1/objects/inputs/%00.png?expires=1&sig={SIG}", "key",
     "key: contains the control character U+0000 at position 7"),
], ids=lambda v: v if v.startswith("/") else None)
def test_control_characters_in_path_parameters_are_422s_naming_the_parameter(api_stack, method, url, field,
                                                                              message):
    r = api_stack.client.request(method, url, headers=api_stack.auth())
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {"code": "invalid_parameter", "message": message, "field": field}


@pytest.mark.parametrize(("url", "field"), [
    ("/v1/jobs?status=%00", "status"),
    ("/v1/jobs?task=%00", "task"),
    ("/v1/jobs?batch_id=%00", "batch_id"),
    ("/v1/jobs?cursor=%00", "cursor"),
    ("/v1/jobs?cursor=AAAAAAAA%00", "cursor"),
    ("/v1/jobs?created_after=%00", "created_after"),
    ("/v1/batches?status=%00", "status"),
    ("/v1/batches?cursor=%00", "cursor"),
    ("/v1/batches/x/jobs?page=%00", "page"),
    ("/v1/usage?from=%00", "from"),
])
def test_control_characters_in_query_parameters_are_422s_naming_the_parameter(api_stack, url, field):
    r = api_stack.client.get(url, headers=api_stack.auth())
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
