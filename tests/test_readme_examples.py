"""The README's request bodies, as written, are accepted by the API on both stacks: every
``curl … $API/v1/… -d '{…}'`` body is read from README.md and sent (the product file id filled in
with a real upload, the adapter id with a real adapter made by ``bagel make-adapter``, a job id
with a job submitted first), so an example a user copies cannot drift into a 4xx."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from tests.fixtures.adapters import make_test_adapter
from tests.fixtures.services import ApiStack

README = Path(__file__).resolve().parents[1] / "README.md"
# `$API/v1/<path> … -d '<json>'`, the path and the body on the same command (the body may span lines).
BODY = re.compile(r"\$API(/v1/(?:[a-z/]|<job id>|<session id>)+)[^'\n]*-d '(\{.*?\})'", re.DOTALL)


def _adapter_id(client: TestClient, api_stack: ApiStack, service_model: Path, folder: Path) -> str:
    made = make_test_adapter(service_model, folder, rank=4)
    r = client.post("/v1/adapters", headers=api_stack.auth(), data={"name": "readme"}, files={
        name: (path.name, path.read_bytes()) for name, path in (
            ("config", made / "adapter_config.json"), ("weights", made / "adapter_model.safetensors"))})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_the_readme_request_bodies_are_accepted_as_written(api_stack: ApiStack, service_model: Path,
                                                           tmp_path: Path) -> None:
    examples = BODY.findall(README.read_text())
    assert sorted(path for path, _ in examples) == ["/v1/batches", "/v1/batches", "/v1/jobs", "/v1/jobs",
                                                    "/v1/jobs/<job id>/rerun", "/v1/sessions",
                                                    "/v1/sessions/<session id>/turns",
                                                    "/v1/sessions/<session id>/turns", "/v1/webhooks/test"]
    product = api_stack.upload_png((64, 64))
    # The default webhook policy (the fixture's settings allow private targets).
    strict = api_stack.settings.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(strict)) as client:
        adapter = _adapter_id(client, api_stack, service_model, tmp_path / "adapter")
        job = client.post("/v1/jobs", json={"task": "generate", "prompt": "a mug"}, headers=api_stack.auth()).json()
        session = client.post("/v1/sessions", json={}, headers=api_stack.auth()).json()
        for path, text in examples:
            body = json.loads(text.replace("<file id>", product).replace("<adapter id>", adapter))
            r = client.post(path.replace("<job id>", job["id"]).replace("<session id>", session["id"]), json=body,
                            headers=api_stack.auth())
            assert r.status_code == (201 if path == "/v1/sessions" else 202), (path, r.text)
            if path == "/v1/batches":
                batch = r.json()
                assert len(batch["job_ids"]) == len(body["items"]) and batch["webhook_url"] == body.get("webhook_url")
                jobs = client.get(f"/v1/batches/{batch['id']}/jobs", headers=api_stack.auth()).json()["items"]
                assert [j["prompt"] for j in jobs] == [item["prompt"] for item in body["items"]]
                assert [j["think"] for j in jobs] == [item.get("think", False) for item in body["items"]]
                assert all(j["adapter"] == body.get("adapter") for j in jobs)
