"""Sessions through real API, dispatcher and GPU worker processes with the tiny real engine
(issue 14).

Covered: a session's turns run in order and each sees the earlier ones — a picture turn's result
differs from the same prompt and seed in a session without that history, and every turn equals
the single interleaved request built from the stored transcript (the documented construction:
``sessions.context_parts`` — the opening, then every earlier turn's pictures, prompt and output
verbatim, then the turn's own — run alone by a fresh ``EngineHolder`` with an empty cache). The
worker that ran a session's turn holds its context: with a second worker up, the next turns go to
it (the dispatcher's preference; their provenance shows the cached parts), and once it is gone a
turn runs on the other worker from the transcript alone (a cache miss) with the same result as
the single request. Deleting the session removes its turns' stored results.
"""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from tests.fixtures.worker import Stack, wait_until
from worker import sessions, tenants
from worker.gpu import EngineHolder, JobInput
from worker.models import Job
from worker.storage import make_store

SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
TURN = {"params": {"num_timesteps": 3}, "seed": 5}


def _client(stack: Stack) -> httpx.Client:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "acme")
        key = tenants.create_api_key(s, tenant.id)[1]
    return httpx.Client(base_url=stack.api_url(), headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _turn(api: httpx.Client, session_id: str, body: dict) -> dict:
    r = api.post(f"/v1/sessions/{session_id}/turns", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = wait_until(lambda: (j := api.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed")
                     and j, 240, 0.25)
    assert job["status"] == "succeeded", job["error"]
    return job


def _output(api: httpx.Client, job: dict) -> str | bytes:
    return job["result"]["text"] if job["task"] == "understand" else api.get(job["result"]["url"]).content


def _single_request(stack: Stack, job_id: str) -> str | bytes:
    """The turn as one interleaved request: its context rebuilt from the stored transcript, run
    alone by a fresh holder (no cached context)."""
    holder = EngineHolder(stack.settings.model_copy(update={"device": "cpu"}))
    with stack.session() as s:
        job = s.get(Job, job_id)
        parts = sessions.context_parts(s, make_store(stack.settings), job)
        spec = JobInput(job_id=job.id, task=job.task, prompt=job.prompt, images=[], think=job.think,
                        width=job.width, height=job.height, params=dict(job.params), parts=parts)
    out = holder.run([spec], progress=lambda *a: None, should_cancel=lambda i: False)[0]
    assert out.error_code is None, out.error_message
    return out.text if job.task == "understand" else out.png


def _pixels_close(a: bytes, b: bytes) -> bool:
    x, y = Image.open(io.BytesIO(a)).convert("RGB"), Image.open(io.BytesIO(b)).convert("RGB")
    return x.size == y.size and max(abs(p - q) for u, v in zip(x.getdata(), y.getdata(), strict=True)
                                    for p, q in zip(u, v)) <= 1


def _same(a: str | bytes, b: str | bytes) -> bool:
    return a == b if isinstance(a, str) else _pixels_close(a, b)


def _provenance(api: httpx.Client, job: dict) -> dict:
    return api.get(f"/v1/jobs/{job['id']}/provenance").json()


@SQLITE_ONLY
def test_turns_see_the_earlier_turns_on_any_worker(stack: Stack) -> None:
    for role in ("api", "reconciler"):
        stack.start(role)
    first_worker = stack.start("gpu")
    api = _client(stack)
    mascot = api.post("/v1/files", files={"file": ("m.png", _png((200, 80, 30)), "image/png")}).json()["id"]
    session = api.post("/v1/sessions", json={"system_prompt": "You draw Mira, a red fox.",
                                             "parts": [{"file_id": mascot}, {"text": "This is Mira."}]}).json()
    turns = [_turn(api, session["id"], {"task": "understand", "prompt": "Who is this?"})]
    stack.start("gpu")  # a second worker: the session's turns still go to the first
    turns.append(_turn(api, session["id"], {"task": "generate", "prompt": "Mira in the snow", **TURN}))
    turns.append(_turn(api, session["id"], {"task": "understand", "prompt": "Where is Mira now?"}))
    assert [t["turn_index"] for t in turns] == [0, 1, 2]
    holder = _provenance(api, turns[0])["worker_id"]
    for turn in turns[1:]:  # the worker holding the session's context ran it, from that context
        prov = _provenance(api, turn)
        assert prov["worker_id"] == holder and prov["session_context"]["reused_parts"] > 0, prov

    first_worker.stop()  # its cache is gone: the next turn is rebuilt from the transcript elsewhere
    turns.append(_turn(api, session["id"], {"task": "edit", "prompt": "give her a blue hat", **TURN}))
    prov = _provenance(api, turns[3])
    assert prov["worker_id"] != holder and prov["session_context"]["reused_parts"] == 0, prov

    for turn in turns:  # cache hit or miss, each turn is the single interleaved request
        assert _same(_output(api, turn), _single_request(stack, turn["id"])), turn["turn_index"]

    fresh = api.post("/v1/sessions", json={}).json()  # the same prompt and seed without the history
    alone = _turn(api, fresh["id"], {"task": "generate", "prompt": "Mira in the snow", "width": 32, "height": 32,
                                     **TURN})
    assert _output(api, alone) != _output(api, turns[1])

    transcript = api.get(f"/v1/sessions/{session['id']}").json()["transcript"]
    said = [(item["role"], item["kind"], item["turn"]) for item in transcript]
    assert said[:3] == [("system", "text", None), ("user", "image", None), ("user", "text", None)]
    assert said[3:] == [(role, kind, n) for n, out in enumerate(("text", "image", "text", "image"))
                        for role, kind in (("user", "text"), ("assistant", out))]
    with stack.session() as s:
        keys = [j.output_key for j in s.scalars(select(Job).where(Job.session_id == session["id"])).all()
                if j.output_key]
    store = make_store(stack.settings)
    assert len(keys) == 4 and all(store.exists(key) for key in keys)  # two answers (text), two pictures
    assert api.delete(f"/v1/sessions/{session['id']}").status_code == 204
    assert not any(store.exists(key) for key in keys)
