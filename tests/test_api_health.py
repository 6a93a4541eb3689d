"""/healthz, /readyz (database, broker, storage really checked), OpenAPI docs, and a broker
outage that still accepts jobs (committed as queued, left for the reconciler)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select

from api.main import create_app
from worker.models import Chunk, Job


def test_healthz_and_readyz_on_healthy_services(api_stack):
    assert api_stack.client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = api_stack.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


def test_readyz_names_what_is_down(api_stack, make_settings):
    broken = {"broker_url": "redis://127.0.0.1:9/0"}
    if api_stack.settings.storage_backend == "s3":
        broken["s3_secret_access_key"] = SecretStr("wrong")
    else:
        blocker = api_stack.settings.storage_dir.parent / "not-a-dir"
        blocker.write_text("file")
        broken["storage_dir"] = blocker / "storage"
    settings = api_stack.settings.model_copy(update=broken)
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["broker"].startswith("unavailable") and checks["storage"].startswith("unavailable")


def test_a_broker_outage_does_not_touch_submission(api_stack):
    """Submit never talks to the broker: with it unreachable the job is accepted and waits in the
    database, unchunked, for the dispatcher."""
    settings = api_stack.settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/jobs", headers=api_stack.auth(),
                        json={"task": "generate", "prompt": "x", "width": 32, "height": 32})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    with api_stack.session() as s:
        assert s.scalars(select(Chunk)).all() == []
        [job] = s.scalars(select(Job)).all()
        assert job.chunk_id is None and job.status == "queued"


def test_openapi_docs_list_every_route(api_stack):
    assert api_stack.client.get("/docs").status_code == 200
    paths = api_stack.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/files", "/v1/files/{file_id}", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                 "/v1/batches", "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/jobs",
                 "/v1/batches/{batch_id}/cancel", "/v1/objects/{key}", "/healthz", "/readyz", "/v1/usage",
                 "/metrics"):
        assert path in paths, path
    limits = api_stack.client.get("/openapi.json").json()["components"]["schemas"]["GenerationParamsIn"]
    steps = limits["properties"]["num_timesteps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (2, 200)


def test_unknown_routes_use_the_error_format(api_stack):
    r = api_stack.client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api_stack.client.delete("/v1/jobs", headers=api_stack.auth())
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
