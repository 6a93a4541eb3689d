"""Provenance and re-run (issue 12): every job a GPU worker finishes stores what made it, and
``POST /v1/jobs/{id}/rerun`` submits the same request again as a new job linked to the first.

Covered: the weights identity is the same for the same checkpoint files and changes with one
tensor's sampled bytes (another seed's checkpoint, one byte at a tensor's start) but not with a
byte in a large tensor's middle (what "a sample of bytes" means); a succeeded job's provenance
lists every field with values that match the worker's torch, the checkpoint's hash and the
stored PNG; a re-run without overrides makes the same PNG bit for bit in the same worker process
and after the GPU worker restarted, and links ``rerun_of``; a re-run with another seed makes
another picture and records the seed; on both stacks, without a GPU worker: a queued job's
provenance is a 409, it can be re-run (same request, seed included; a try-on keeps its input and
size; an adapter job keeps its adapter and scale, and is refused once the adapter is deleted),
overrides out of range are 422s naming the field and the limit with nothing stored, an
``Idempotency-Key`` replays the first re-run, and another tenant's job is a 404 on both routes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import struct
from pathlib import Path

import httpx
import pytest
import torch

from api.routes.provenance import Provenance
from bagel.identity import weights_identity
from bagel.tiny import make_tiny
from tests.fixtures.adapters import make_test_adapter
from tests.fixtures.worker import Stack, wait_until
from worker import tenants

SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
TIMEOUT_S = 60.0
GENERATE = {"task": "generate", "prompt": "a red mug on a desk", "width": 32, "height": 32,
            "params": {"num_timesteps": 2, "seed": 3}, "metadata": {"sku": "MUG-01"}}


# ---- weights identity ------------------------------------------------------------------------

def _tensor_span(folder: Path, file: str, pick: str) -> tuple[int, int]:
    """Absolute byte range in ``folder/file`` of its largest tensor (``pick="largest"``) or first."""
    raw = (folder / file).read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = {k: v for k, v in json.loads(raw[8:8 + size]).items() if k != "__metadata__"}
    name = max(header, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) \
        if pick == "largest" else sorted(header)[0]
    begin, end = header[name]["data_offsets"]
    return 8 + size + begin, 8 + size + end


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_weights_hash_follows_the_checkpoint_files(service_model: Path, tmp_path: Path) -> None:
    first = weights_identity(service_model)
    assert len(first) == 64 and weights_identity(service_model) == first
    same = shutil.copytree(service_model, tmp_path / "copy")
    assert weights_identity(same) == first  # a copy of the same files: the same identity
    assert weights_identity(make_tiny(tmp_path / "seed1", seed=1)) != first  # other weights

    begin, _ = _tensor_span(same, "ema.safetensors", "first")
    _flip(same / "ema.safetensors", begin)
    assert weights_identity(same) != first  # one byte of one tensor's sample
    _flip(same / "ema.safetensors", begin)
    begin, end = _tensor_span(same, "ae.safetensors", "largest")
    assert end - begin > 4 * 4096
    _flip(same / "ae.safetensors", (begin + end) // 2)
    assert weights_identity(same) == first  # a sample: the middle of a large tensor is not read


# ---- through a GPU worker --------------------------------------------------------------------

def _client(stack: Stack, name: str) -> httpx.Client:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, name)
        key = tenants.create_api_key(s, tenant.id)[1]
    return httpx.Client(base_url=stack.api_url(), headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S)


def _finished(api: httpx.Client, job_id: str) -> dict:
    def done() -> dict | None:
        job = api.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed") else None

    job = wait_until(done, 240, 0.25)
    assert job["status"] == "succeeded", job["error"]
    return job


def _png(api: httpx.Client, job_id: str) -> bytes:
    return api.get(_finished(api, job_id)["result"]["url"]).content


def _rerun(api: httpx.Client, job_id: str, body: dict | None = None) -> dict:
    r = api.post(f"/v1/jobs/{job_id}/rerun", **({} if body is None else {"json": body}))
    assert r.status_code == 202, r.text
    return r.json()


@SQLITE_ONLY
def test_a_job_records_its_provenance_and_a_rerun_reproduces_its_png(stack: Stack, service_model: Path) -> None:
    for role in ("api", "reconciler", "gpu"):
        stack.start(role)
    api = _client(stack, "acme")
    r = api.post("/v1/jobs", json=GENERATE)
    assert r.status_code == 202, r.text
    first = r.json()
    png = _png(api, first["id"])

    prov = api.get(f"/v1/jobs/{first['id']}/provenance").json()
    assert set(prov) == set(Provenance.model_fields)
    assert prov["weights_sha256"] == weights_identity(service_model) and prov["model"] == service_model.name
    assert (prov["quantization"], prov["offload"], prov["dtype"], prov["device"]) == ("none", "none", "float32", "cpu")
    assert prov["device_name"] == platform.machine() and prov["torch_threads"] >= 1
    assert prov["torch_version"] == torch.__version__ and prov["cuda_version"] == torch.version.cuda
    assert prov["cudnn_version"] is None and prov["bitsandbytes_version"] is None
    assert prov["engine_version"] == importlib.metadata.version("bagel-jobs")
    assert prov["python_version"] == platform.python_version()
    assert prov["noise_source"].startswith("torch.Generator(device='cpu').manual_seed(params.seed)")
    assert prov["params"] == first["params"] and prov["seed"] == 3 == first["params"]["seed"]
    assert (prov["task"], prov["width"], prov["height"]) == ("generate", 32, 32)
    assert (prov["think"], prov["think_text"], prov["think_text_sha256"], prov["taylorseer"]) == (False, None, None,
                                                                                                  False)
    assert (prov["adapter_id"], prov["adapter_scale"], prov["rerun_of"]) == (None, None, None)
    assert prov["output_sha256"] == hashlib.sha256(png).hexdigest()
    assert prov["status"] == "succeeded" and prov["record_version"] == 1 and prov["recorded_at"]
    assert prov["worker_id"].startswith(prov["hostname"] + ":")

    again = _rerun(api, first["id"])  # no body: the same request
    assert again["rerun_of"] == first["id"] and again["id"] != first["id"]
    assert (again["params"], again["prompt"], again["metadata"]) == (first["params"], first["prompt"],
                                                                     first["metadata"])
    assert _png(api, again["id"]) == png  # bit for bit, same worker process
    second = api.get(f"/v1/jobs/{again['id']}/provenance").json()
    assert second["rerun_of"] == first["id"] and second["output_sha256"] == prov["output_sha256"]

    other_seed = _rerun(api, first["id"], {"seed": 4})
    assert other_seed["params"] == {**first["params"], "seed": 4}
    assert _png(api, other_seed["id"]) != png
    assert api.get(f"/v1/jobs/{other_seed['id']}/provenance").json()["seed"] == 4

    gpu = next(p for p in stack.procs if p.name == "gpu")
    gpu.stop()
    stack.start("gpu")
    assert _png(api, _rerun(api, first["id"])["id"]) == png  # bit for bit, a new worker process


# ---- the API alone, both stacks --------------------------------------------------------------

def test_a_queued_job_can_be_rerun_and_has_no_provenance_yet(api_stack) -> None:
    client, auth = api_stack.client, api_stack.auth()
    first = client.post("/v1/jobs", json=GENERATE, headers=auth).json()
    r = client.get(f"/v1/jobs/{first['id']}/provenance", headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "provenance_not_recorded"
    assert "queued" in r.json()["error"]["message"]

    r = client.post(f"/v1/jobs/{first['id']}/rerun", headers=auth)
    assert r.status_code == 202, r.text
    again = r.json()
    assert again["rerun_of"] == first["id"] and again["status"] == "queued"
    for name in ("task", "prompt", "width", "height", "params", "think", "metadata", "adapter", "input_file_ids"):
        assert again[name] == first[name], name
    assert client.get(f"/v1/jobs/{again['id']}", headers=auth).json()["rerun_of"] == first["id"]

    product = api_stack.upload_png((64, 48))
    tryon = client.post("/v1/jobs", json={"task": "tryon", "prompt": "on a beach", "input_file_ids": [product]},
                        headers=auth).json()
    body = {"seed": 11, "num_timesteps": 3, "cfg_text_scale": 5.0, "cfg_img_scale": 1.5}
    redo = client.post(f"/v1/jobs/{tryon['id']}/rerun", json=body, headers=auth).json()
    assert (redo["input_file_ids"], redo["width"], redo["height"]) == ([product], tryon["width"], tryon["height"])
    assert redo["params"] == {**tryon["params"], **body}


def test_a_rerun_keeps_the_adapter_and_refuses_a_deleted_one(api_stack, service_model: Path, tmp_path: Path) -> None:
    client, auth = api_stack.client, api_stack.auth()
    made = make_test_adapter(service_model, tmp_path / "adapter", rank=4)
    adapter = client.post("/v1/adapters", headers=auth, data={"name": "brand"}, files={
        name: (path.name, path.read_bytes()) for name, path in (
            ("config", made / "adapter_config.json"), ("weights", made / "adapter_model.safetensors"))}).json()["id"]
    first = client.post("/v1/jobs", json={**GENERATE, "adapter": adapter, "adapter_scale": 0.5}, headers=auth).json()
    again = client.post(f"/v1/jobs/{first['id']}/rerun", headers=auth).json()
    assert (again["adapter"], again["params"]["adapter_scale"]) == (adapter, 0.5)
    for job in (first, again):
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert client.delete(f"/v1/adapters/{adapter}", headers=auth).status_code == 204
    r = client.post(f"/v1/jobs/{first['id']}/rerun", headers=auth)
    assert r.status_code == 422 and r.json()["error"]["field"] == "adapter", r.text


def test_a_rerun_is_checked_idempotent_and_private_to_the_tenant(api_stack) -> None:
    client, auth = api_stack.client, api_stack.auth()
    first = client.post("/v1/jobs", json=GENERATE, headers=auth).json()
    before = api_stack.snapshot()
    for body, field, limit in (({"seed": -1}, "seed", ">= 0"), ({"num_timesteps": 201}, "num_timesteps", "<= 200"),
                               ({"cfg_text_scale": 31}, "cfg_text_scale", "<= 30"), ({"steps": 4}, "steps", "")):
        r = client.post(f"/v1/jobs/{first['id']}/rerun", json=body, headers=auth)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        assert limit in r.json()["error"]["message"]
    assert api_stack.snapshot() == before  # nothing stored or enqueued

    headers = {**auth, "Idempotency-Key": "redo-1"}
    once = client.post(f"/v1/jobs/{first['id']}/rerun", json={"seed": 9}, headers=headers)
    twice = client.post(f"/v1/jobs/{first['id']}/rerun", json={"seed": 9}, headers=headers)
    assert once.status_code == twice.status_code == 202 and once.json()["id"] == twice.json()["id"]
    assert twice.headers["Idempotent-Replayed"] == "true"
    r = client.post(f"/v1/jobs/{first['id']}/rerun", json={"seed": 10}, headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"

    other = api_stack.auth(api_stack.other_key)
    for r in (client.post(f"/v1/jobs/{first['id']}/rerun", headers=other),
              client.get(f"/v1/jobs/{first['id']}/provenance", headers=other),
              client.get("/v1/jobs/no-such-job/provenance", headers=auth)):
        assert r.status_code == 404 and r.json()["error"]["field"] == "job_id", r.text
