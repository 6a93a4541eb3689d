"""LoRA adapters through the service (issue 13): ``POST /v1/adapters`` checks a PEFT upload against
the base model and stores it; jobs and batches name it; a real GPU worker (tiny engine) applies it
unmerged, never mixing adapters in a chunk, keeping loaded adapters in its LRU.

Covered: a PEFT-made adapter registers (rank, targets, size), is listed and read, and an upload
repeated with its Idempotency-Key returns the stored adapter (another body with it: 409); a module the
base does not have, a wrong shape and a rank mismatch are 422s naming the module, with nothing
stored; a name used twice is a 422; an unknown adapter or a scale without one is refused at
submit; two tenants' jobs with different adapters, submitted together, run in separate chunks in
one worker and each equals the same job run again on its own (and differs from the other and
from the base model), while a zero-B adapter gives the base model's picture bit for bit; deleting
is a 409 while a queued job uses the adapter, then removes its files.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.adapters import make_test_adapter
from tests.fixtures.worker import Stack, wait_until
from worker import tenants
from worker.models import Adapter, Job
from worker.storage import make_store

SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
TIMEOUT_S = 60.0


def _tenant(stack: Stack, name: str) -> httpx.Client:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, name)
        key = tenants.create_api_key(s, tenant.id)[1]
    return httpx.Client(base_url=stack.api_url(), headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S)


def _upload(api: httpx.Client, folder: Path, name: str, key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return api.post("/v1/adapters", data={"name": name}, headers=headers, files={
        "config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes(), "application/json"),
        "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes(),
                    "application/octet-stream")})


def _rewrite_header(folder: Path, change: Any) -> None:
    """Edit the safetensors header of ``folder``'s weights in place (names, shapes), keeping the data."""
    path = folder / "adapter_model.safetensors"
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size:])


def _generate(api: httpx.Client, adapter: str | None, seed: int = 3) -> str:
    body: dict[str, Any] = {"task": "generate", "prompt": "a red mug on a desk", "width": 32, "height": 32,
                            "params": {"num_timesteps": 2, "seed": seed}}
    if adapter is not None:
        body["adapter"] = adapter
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _result(api: httpx.Client, job_id: str) -> bytes:
    def done() -> dict | None:
        job = api.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed") else None

    job = wait_until(done, 240, 0.25)
    assert job["status"] == "succeeded", job["error"]
    return api.get(job["result"]["url"]).content


def test_an_upload_is_checked_against_the_base_model_and_stored(stack: Stack, service_model: Path,
                                                                 tmp_path: Path) -> None:
    stack.start("api")
    api = _tenant(stack, "brand-a")
    folder = make_test_adapter(service_model, tmp_path / "good", rank=4, seed=1)
    r = _upload(api, folder, "brand-a-style")
    assert r.status_code == 201, r.text
    adapter = r.json()
    assert adapter["rank"] == 4 and adapter["name"] == "brand-a-style" and adapter["target_modules"]
    assert api.get(f"/v1/adapters/{adapter['id']}").json() == adapter
    assert [a["id"] for a in api.get("/v1/adapters").json()["data"]] == [adapter["id"]]
    assert _upload(api, folder, "brand-a-style").json()["error"]["field"] == "name"  # the name is taken
    again = _upload(api, folder, "keyed", key="upload-1")
    assert again.status_code == 201 and _upload(api, folder, "keyed", key="upload-1").json() == again.json()
    assert _upload(api, folder, "other-name", key="upload-1").status_code == 409  # the key, another request

    def module_of(header: dict) -> str:
        return next(k for k in header if k != "__metadata__" and ".lora_A." in k)

    def rename(header: dict) -> None:  # a module the base does not have, A and B alike
        a = module_of(header)
        for key in (a, a.replace("lora_A", "lora_B")):
            header[re.sub(r"\.[a-z_]+(\.lora_[AB]\.weight)$", r".zz_proj\1", key)] = header.pop(key)

    cases = {
        "unknown": rename,
        "shape": lambda h: h[module_of(h).replace("lora_A", "lora_B")].update(
            shape=[h[module_of(h).replace("lora_A", "lora_B")]["shape"][0] + 16, 4]),
        "rank": lambda h: h[module_of(h)].update(shape=[2, h[module_of(h)]["shape"][1]]),
    }
    with stack.session() as s:
        before = s.query(Adapter).count()
    for name, change in cases.items():
        bad = make_test_adapter(service_model, tmp_path / name, rank=4, seed=1)
        _rewrite_header(bad, change)
        r = _upload(api, bad, f"bad-{name}")
        assert r.status_code == 422, (name, r.text)
        assert "layers." in r.json()["error"]["message"], (name, r.json())  # names the module
    with stack.session() as s:
        assert s.query(Adapter).count() == before

    assert api.post("/v1/jobs", json={"task": "generate", "prompt": "x", "adapter": "nope"}).json()["error"][
        "field"] == "adapter"
    assert api.post("/v1/jobs", json={"task": "generate", "prompt": "x", "adapter_scale": 0.5}).json()["error"][
        "field"] == "adapter_scale"
    other = _tenant(stack, "brand-b")
    assert other.get(f"/v1/adapters/{adapter['id']}").status_code == 404
    assert other.post("/v1/jobs", json={"task": "generate", "prompt": "x", "adapter": adapter["id"]}
                      ).json()["error"]["code"] == "unknown_adapter"


@SQLITE_ONLY
def test_two_tenants_adapters_run_in_one_worker_each_with_its_own_result(stack: Stack, service_model: Path,
                                                                         tmp_path: Path) -> None:
    stack.start("api")
    a, b = _tenant(stack, "brand-a"), _tenant(stack, "brand-b")
    adapter_a = _upload(a, make_test_adapter(service_model, tmp_path / "a", rank=4, seed=1), "a").json()["id"]
    adapter_b = _upload(b, make_test_adapter(service_model, tmp_path / "b", rank=4, seed=2), "b").json()["id"]
    zero = _upload(a, make_test_adapter(service_model, tmp_path / "zero", rank=4, seed=3, zero_b=True),
                   "zero").json()["id"]
    first = {"a": _generate(a, adapter_a), "b": _generate(b, adapter_b), "base": _generate(a, None),
             "zero": _generate(a, zero)}
    with stack.session() as s:
        keys = {name: s.get(Job, job_id).chunk_key for name, job_id in first.items()}
    assert len({keys["a"], keys["b"], keys["base"], keys["zero"]}) == 4  # a chunk never mixes adapters

    for role in ("reconciler", "gpu"):
        stack.start(role)
    pictures = {name: _result(a if name != "b" else b, job_id) for name, job_id in first.items()}
    with stack.session() as s:
        chunks = {name: s.get(Job, job_id).chunk_id for name, job_id in first.items()}
    assert len(set(chunks.values())) == 4
    assert pictures["zero"] == pictures["base"]  # B = 0: the base model's picture, bit for bit
    assert len({pictures["a"], pictures["b"], pictures["base"]}) == 3
    again = {"a": _result(a, _generate(a, adapter_a)), "b": _result(b, _generate(b, adapter_b))}
    assert again == {"a": pictures["a"], "b": pictures["b"]}  # each its own, whatever ran before


def test_an_adapter_in_use_cannot_be_deleted_then_its_files_go(stack: Stack, service_model: Path,
                                                               tmp_path: Path) -> None:
    stack.start("api")
    api = _tenant(stack, "brand-a")
    adapter = _upload(api, make_test_adapter(service_model, tmp_path / "a", rank=4, seed=1), "a").json()
    job_id = _generate(api, adapter["id"])  # no GPU worker: it stays queued
    with stack.session() as s:
        row = s.get(Adapter, adapter["id"])
        files = [row.config_key, row.weights_key]
    store = make_store(stack.settings)
    assert all(store.exists(key) for key in files)
    r = api.delete(f"/v1/adapters/{adapter['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"
    assert api.delete(f"/v1/adapters/{adapter['id']}").status_code == 204
    assert api.get(f"/v1/adapters/{adapter['id']}").status_code == 404
    with stack.session() as s:
        assert s.get(Job, job_id).adapter_id is None  # the finished job keeps its record, without the adapter
    assert not any(store.exists(key) for key in files)
