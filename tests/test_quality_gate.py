"""The quality gate (issue 12): the tiny real engine judges its pictures, the service makes them
again with the next seed, and the job keeps every attempt.

Covered through ``worker.gpu.EngineHolder`` (the code a GPU worker runs): the score reads the
engine's yes/no token probabilities and is the same for the same seed; a threshold the first
picture fails makes the job again with the next seed and keeps both, the better one as the
result and the same PNG as that seed run alone; ``max_regenerations`` bounds the attempts (a
threshold nothing reaches: ``best_effort``); the gate's passes of a chunk are batched (four
gated jobs take the gate forwards one takes) and a job without the gate in the same chunk is
made once; each regeneration round is one engine call for the jobs still below. Through the embedded stack's processes: a gated try-on stores every attempt (each
downloadable, the chosen one the result), its ``job.succeeded`` event carries the verdict and
matches the contract, its provenance names the seed kept, the orphan sweep keeps the attempts;
a tenant's own question set (``bagel-jobs tenant quality``) is what the gate asks; the API
refuses a gate on an understand job and a threshold out of range, storing nothing.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from tests.fixtures.contract import assert_event_matches_contract
from tests.fixtures.worker import ROOT, Stack, wait_until
from worker import params, quality, tenants
from worker.gpu import EngineHolder, JobInput
from worker.models import Job
from worker.orphans import sweep_orphans
from worker.storage import make_store

SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
NO_PROGRESS = {"progress": lambda *a: None, "should_cancel": lambda i: False}


def _png(color: tuple[int, int, int], px: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (px, px), color).save(buf, format="PNG")
    return buf.getvalue()


def _job(job_id: str, seed: int, *, threshold: float | None = None, regenerations: int = 0, task: str = "generate",
         images: list[bytes] | None = None) -> JobInput:
    resolved = params.resolve(task, {"num_timesteps": 3, "seed": seed}, False)
    prompt = "a mug on a desk"
    if threshold is not None:
        resolved["quality_gate"] = quality.gate_params(threshold, regenerations)
    return JobInput(job_id=job_id, task=task, prompt=prompt, images=images or [], think=False, width=32, height=32,
                    params=resolved, gate=quality.spec_for(task, prompt, resolved, None))


@pytest.fixture(scope="module")
def holder(make_settings, service_model) -> EngineHolder:
    return EngineHolder(make_settings(model_path=str(service_model), device="cpu"))


def _score_of(holder: EngineHolder, seed: int) -> tuple[float, bytes]:
    out = holder.run([_job("probe", seed, threshold=0.0)], **NO_PROGRESS)[0]
    return out.quality["score"], out.png


def test_the_score_is_read_from_token_probabilities_and_is_the_same_for_a_seed(holder):
    first = holder.run([_job("a", 11, threshold=0.0)], **NO_PROGRESS)[0]
    again = holder.run([_job("a", 11, threshold=0.0)], **NO_PROGRESS)[0]
    answers = first.quality["attempts"][0]["answers"]
    assert [a["question"] for a in answers] == list(quality.spec_for(
        "generate", "a mug on a desk", {"quality_gate": quality.gate_params(0.0, 0)}, None).questions)
    for a in answers:
        assert 0.0 < a["yes_prob"] < 1.0 and 0.0 < a["no_prob"] < 1.0
        assert a["p_yes"] == pytest.approx(a["yes_prob"] / (a["yes_prob"] + a["no_prob"]), rel=1e-5)
    assert first.quality == again.quality and first.png == again.png
    assert first.quality["score"] == pytest.approx(sum(a["p_yes"] for a in answers) / len(answers), abs=1e-6)
    assert (first.quality["gate"], first.quality["chosen"], len(first.attempts)) == ("passed", 0, 1)


def test_a_picture_below_the_threshold_is_made_again_with_the_next_seed(holder):
    for seed in range(20, 40):  # a seed whose next seed scores higher
        low, _ = _score_of(holder, seed)
        high, next_png = _score_of(holder, seed + 1)
        if high > low:
            break
    else:
        pytest.fail("no seed in 20..39 is followed by a better-scoring one")
    threshold = (low + high) / 2
    out = holder.run([_job("j", seed, threshold=threshold, regenerations=3)], **NO_PROGRESS)[0]
    record = out.quality
    assert [a["seed"] for a in record["attempts"]] == [seed, seed + 1]  # stopped once it passed
    assert [a["score"] for a in record["attempts"]] == pytest.approx([low, high], abs=1e-6)
    assert (record["gate"], record["chosen"], record["threshold"]) == ("passed", 1, threshold)
    assert out.png == next_png and out.attempts[1] == next_png and len(out.attempts) == 2
    assert out.regeneration_seconds > 0 and out.stats["seed"] == seed + 1


def test_max_regenerations_bounds_the_attempts_and_the_best_is_kept(holder):
    out = holder.run([_job("j", 50, threshold=1.0, regenerations=2)], **NO_PROGRESS)[0]
    record = out.quality
    assert [a["seed"] for a in record["attempts"]] == [50, 51, 52]
    scores = [a["score"] for a in record["attempts"]]
    assert record["gate"] == "best_effort" and record["chosen"] == scores.index(max(scores))
    assert out.png == out.attempts[record["chosen"]]
    none = holder.run([_job("j", 50, threshold=1.0, regenerations=0)], **NO_PROGRESS)[0]
    assert len(none.quality["attempts"]) == 1 and none.quality["gate"] == "best_effort"


def test_the_gate_passes_of_a_chunk_are_batched(holder):
    product = _png((40, 160, 90))
    one = holder.run([_job("t0", 60, threshold=0.0, task="tryon", images=[product])], **NO_PROGRESS)[0]
    chunk = [_job(f"t{i}", 60 + i, threshold=0.0, task="tryon", images=[product]) for i in range(4)]
    chunk.append(_job("plain", 70, task="tryon", images=[product]))  # no gate
    outs = holder.run(chunk, **NO_PROGRESS)
    assert one.stats["run_gate_llm_forwards"] > 0
    assert {o.stats["run_gate_llm_forwards"] for o in outs} == {one.stats["run_gate_llm_forwards"]}
    # batched and alone agree up to float summation order
    assert outs[0].quality["score"] == pytest.approx(one.quality["score"], abs=1e-4)
    assert outs[4].quality is None and outs[4].attempts is None and outs[4].png is not None
    # the product encoded once for all five jobs and for the gate; each judged picture once
    assert {o.stats["run_context_encodes"] for o in outs} == {1 + 4}


def test_each_regeneration_round_is_one_engine_call_for_the_jobs_still_below(holder, caplog):
    """Two gated jobs that never pass, allowed 1 and 2 regenerations, beside one without the gate:
    the first round makes both again, the second only the one with an attempt left."""
    caplog.set_level(logging.INFO, logger="worker.quality")
    outs = holder.run([_job("a", 80, threshold=1.0, regenerations=1), _job("b", 90, threshold=1.0, regenerations=2),
                       _job("c", 95)], **NO_PROGRESS)
    rounds = [int(r.getMessage().split()[2]) for r in caplog.records if "made again" in r.getMessage()]
    assert rounds == [2, 1]
    assert [len(o.attempts or []) for o in outs] == [2, 3, 0]


# ---- through the service ---------------------------------------------------------------------

def _client(stack: Stack, name: str) -> tuple[httpx.Client, str]:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, name)
        key = tenants.create_api_key(s, tenant.id)[1]
        tenant_id = tenant.id
    return httpx.Client(base_url=stack.api_url(), headers={"Authorization": f"Bearer {key}"}, timeout=60), tenant_id


def _finished(api: httpx.Client, job_id: str) -> dict:
    job = wait_until(lambda: (j := api.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed")
                     and j, 240, 0.25)
    assert job["status"] == "succeeded", job["error"]
    return job


@SQLITE_ONLY
def test_a_gated_tryon_keeps_every_attempt_and_says_so(stack: Stack, receiver, tmp_path) -> None:
    for role in ("api", "reconciler", "gpu", "webhooks"):
        stack.start(role)
    api, _ = _client(stack, "acme")
    product = api.post("/v1/files", files={"file": ("p.png", _png((200, 60, 20), 32), "image/png")}).json()["id"]
    body = {"task": "tryon", "prompt": "on a beach towel", "input_file_ids": [product], "seed": 7,
            "params": {"num_timesteps": 2}, "quality_gate": {"threshold": 1.0, "max_regenerations": 1},
            "webhook_url": receiver.url}
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = _finished(api, r.json()["id"])
    record = job["quality"]
    assert (record["gate"], record["questions_version"], len(record["attempts"])) == \
        ("best_effort", quality.QUESTIONS_VERSION, 2)
    assert [a["seed"] for a in record["attempts"]] == [7, 8]
    assert len(record["attempts"][0]["answers"]) == len(quality.BUILTIN_QUESTIONS["tryon"])
    result = api.get(job["result"]["url"]).content
    pictures = [api.get(a["url"]).content for a in record["attempts"]]
    assert pictures[record["chosen"]] == result and pictures[0] != pictures[1]
    assert all(p.startswith(b"\x89PNG") for p in pictures)
    prov = api.get(f"/v1/jobs/{job['id']}/provenance").json()
    assert prov["seed"] == 7 and prov["result_seed"] == 7 + record["chosen"]
    assert prov["quality_gate"] == {"threshold": 1.0, "max_regenerations": 1}
    event = receiver.wait_for("job.succeeded")[0].json()
    assert_event_matches_contract(event)
    assert event["data"]["quality"] == {"gate": "best_effort", "score": record["score"], "threshold": 1.0,
                                        "attempts": 2}
    store = make_store(stack.settings)
    sweep_orphans(stack.session, store, grace_s=0)  # objects of earlier tests' deleted rows may go
    with stack.session() as s:  # the attempt that is not the result is held by the job's record
        stored = s.get(Job, job["id"]).quality["attempts"]
    assert all(store.exists(a["output_key"]) for a in stored)
    assert api.get(record["attempts"][1 - record["chosen"]]["url"]).status_code == 200

    own = {"tryon": ["Is the {prompt} scene calm? Answer yes or no."]}
    (tmp_path / "q.json").write_text(json.dumps(own))
    cli = subprocess.run([sys.executable, "-m", "worker.cli", "tenant", "quality", "acme", "--gate-questions",
                          str(tmp_path / "q.json")], env=stack.env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["gate_questions"] == own
    mine = _finished(api, api.post("/v1/jobs", json=dict(body, seed=9, quality_gate={"threshold": 0.0})).json()["id"])
    asked = mine["quality"]["attempts"][0]["answers"]
    assert [a["question"] for a in asked] == ["Is the on a beach towel scene calm? Answer yes or no."]
    assert mine["quality"]["questions_version"].startswith("tenant-") and mine["quality"]["gate"] == "passed"


@SQLITE_ONLY
def test_the_api_refuses_a_gate_it_cannot_run(stack: Stack) -> None:
    stack.start("api")
    api, _ = _client(stack, "acme")
    product = api.post("/v1/files", files={"file": ("p.png", _png((1, 2, 3), 32), "image/png")}).json()["id"]
    cases = [({"task": "understand", "prompt": "what is it?", "input_file_ids": [product],
               "quality_gate": {}}, "quality_gate", "generate, edit, tryon"),
             ({"task": "generate", "prompt": "a mug", "quality_gate": {"threshold": 1.5}}, "quality_gate.threshold",
              "1"),
             ({"task": "generate", "prompt": "a mug", "quality_gate": {"max_regenerations": 9}},
              "quality_gate.max_regenerations", str(quality.MAX_REGENERATIONS))]
    for body, field, limit in cases:
        r = api.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["field"] == field and limit in error["message"], error
    with stack.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
