"""Sessions without a GPU worker, on both stacks (issue 14): what is checked at submission and
what the database schedules.

Covered: a session with opening parts is created and read back with its transcript; unknown
files, an edit with no picture in the context, a size on a picture turn and a context over
``session_max_context_tokens`` are 422s naming the field (the last one the count and the limit)
with nothing stored; another tenant's session is a 404; turns take their places in order and a
turn submitted while the one before it waits is not dispatched until that one succeeded; when a
turn is canceled the turn waiting on it fails (``previous_turn_failed``); turns count against
the tenant's waiting-jobs limit; deleting a session deletes its turns and their stored results.
"""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.main import create_app
from bagel.sizes import vae_size
from tests.fixtures.services import ApiStack
from worker import tenants
from worker.models import Job, ModelSession, Worker, WorkerState, utcnow
from worker.scheduler import Dispatcher
from worker.params import picture_constants
from worker.storage import make_store, output_key


def _session(api: ApiStack, body: dict | None = None, client: TestClient | None = None) -> dict:
    r = (client or api.client).post("/v1/sessions", json=body or {}, headers=api.auth())
    assert r.status_code == 201, r.text
    return r.json()


def _turn(api: ApiStack, session_id: str, body: dict, client: TestClient | None = None):
    return (client or api.client).post(f"/v1/sessions/{session_id}/turns", json=body, headers=api.auth())


def test_a_session_is_created_read_and_checked(api_stack: ApiStack) -> None:
    picture = api_stack.upload_png((48, 32))
    created = _session(api_stack, {"system_prompt": "You draw Mira, a red fox.",
                                   "parts": [{"file_id": picture}, {"text": "This is Mira."}],
                                   "metadata": {"game": "quest"}})
    got = api_stack.client.get(f"/v1/sessions/{created['id']}", headers=api_stack.auth()).json()
    assert got["transcript"][0] == {"role": "system", "kind": "text", "text": "You draw Mira, a red fox.",
                                    "file_id": None, "url": None, "turn": None, "job_id": None}
    assert [(i["role"], i["kind"]) for i in got["transcript"]] == [("system", "text"), ("user", "image"),
                                                                  ("user", "text")]
    assert got["transcript"][1]["file_id"] == picture and got["transcript"][1]["url"]
    assert got["turns"] == [] and 0 < got["context_tokens"] < got["max_context_tokens"]
    assert got["metadata"] == {"game": "quest"}

    before = api_stack.row_counts()
    bad = api_stack.client.post("/v1/sessions", json={"parts": [{"file_id": "nope"}]}, headers=api_stack.auth())
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "parts[0].file_id"
    both = api_stack.client.post("/v1/sessions", json={"parts": [{"text": "a", "file_id": picture}]},
                                 headers=api_stack.auth())
    assert both.status_code == 422 and both.json()["error"]["field"].startswith("parts[0]")
    empty = _session(api_stack)
    edit = _turn(api_stack, empty["id"], {"task": "edit", "prompt": "make it blue"})
    assert edit.status_code == 422 and edit.json()["error"]["field"] == "task"
    sized = _turn(api_stack, created["id"], {"task": "generate", "prompt": "Mira", "width": 64, "height": 64})
    assert sized.status_code == 422 and sized.json()["error"]["field"] == "width"
    unknown = _turn(api_stack, created["id"], {"task": "understand", "prompt": "who?", "input_file_ids": ["nope"]})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "input_file_ids[0]"
    after = api_stack.row_counts()
    assert after["jobs"] == before["jobs"] and after["sessions"] == before["sessions"] + 1  # only `empty`

    other = api_stack.client.get(f"/v1/sessions/{created['id']}", headers=api_stack.auth(api_stack.other_key))
    assert other.status_code == 404 and other.json()["error"]["field"] == "session_id"
    assert _turn(api_stack, "nope", {"task": "understand", "prompt": "hi"}).status_code == 404


def test_a_turn_over_the_context_limit_is_refused(api_stack: ApiStack) -> None:
    small = replace_settings(api_stack, session_max_context_tokens=600)
    with TestClient(create_app(small)) as client:
        session = _session(api_stack, {"system_prompt": "x" * 100}, client=client)
        fits = _turn(api_stack, session["id"], {"task": "understand", "prompt": "short?",
                                                "params": {"max_new_tokens": 64}}, client=client)
        assert fits.status_code == 202, fits.text
        before = api_stack.row_counts()["jobs"]
        over = _turn(api_stack, session["id"], {"task": "understand", "prompt": "y" * 520,
                                                "params": {"max_new_tokens": 64}}, client=client)
        assert over.status_code == 422, over.text
        error = over.json()["error"]
        assert error["code"] == "context_too_long" and error["field"] == "prompt"
        assert "session_max_context_tokens limit of 600" in error["message"]
        assert api_stack.row_counts()["jobs"] == before


def replace_settings(api: ApiStack, **changes):
    return api.settings.model_copy(update=changes)


def test_turns_run_in_order_and_a_failed_turn_fails_the_next(api_stack: ApiStack) -> None:
    session = _session(api_stack, {"system_prompt": "You answer briefly."})
    first = _turn(api_stack, session["id"], {"task": "understand", "prompt": "hello?"}).json()
    second = _turn(api_stack, session["id"], {"task": "generate", "prompt": "a fox", "seed": 1}).json()
    assert (first["turn_index"], second["turn_index"]) == (0, 1) and second["session_id"] == session["id"]
    with api_stack.session() as s:
        rows = {j.id: j for j in s.scalars(select(Job).where(Job.session_id == session["id"])).all()}
    assert rows[first["id"]].after_job_id is None and rows[second["id"]].after_job_id == first["id"]
    with api_stack.session() as s:  # a ready worker, so that the dispatcher has room in its window
        s.add(Worker(id="w-ready", state=WorkerState.ready, started_at=utcnow(), last_seen=utcnow()))
        s.commit()
    report = Dispatcher(api_stack.settings, api_stack.session, owner="test").dispatch_once()
    assert report.leader and report.formed == 1  # the first turn only: the second waits for it
    with api_stack.session() as s:
        assert s.get(Job, first["id"]).chunk_id is not None
        assert s.get(Job, second["id"]).chunk_id is None
    third = _turn(api_stack, session["id"], {"task": "understand", "prompt": "and now?"}).json()
    canceled = api_stack.client.post(f"/v1/jobs/{first['id']}/cancel", headers=api_stack.auth()).json()
    assert canceled["status"] == "canceled"
    for job_id in (second["id"], third["id"]):  # each needed the one before it
        job = api_stack.client.get(f"/v1/jobs/{job_id}", headers=api_stack.auth()).json()
        assert job["status"] == "failed" and job["error"]["code"] == "previous_turn_failed", job
    got = api_stack.client.get(f"/v1/sessions/{session['id']}", headers=api_stack.auth()).json()
    assert [t["status"] for t in got["turns"]] == ["canceled", "failed", "failed"]
    assert [i["role"] for i in got["transcript"]] == ["system"]  # no turn that ended without a result


def test_a_turn_counts_the_turns_still_to_run_before_it(api_stack: ApiStack) -> None:
    session = _session(api_stack)
    pending = _turn(api_stack, session["id"], {"task": "generate", "prompt": "a fox", "width": 64, "height": 48})
    edit = _turn(api_stack, session["id"], {"task": "edit", "prompt": "give it a hat", "seed": 4})
    assert pending.status_code == 202 and edit.status_code == 202, edit.text  # the picture it will edit is coming
    made = (pending.json()["width"], pending.json()["height"])  # the edit takes that picture as the model resizes it
    assert (edit.json()["width"], edit.json()["height"]) == vae_size(*made, picture_constants(api_stack.settings.model_path))
    picture = api_stack.upload_png((32, 32))
    asking = _turn(api_stack, session["id"], {"task": "understand", "prompt": "what is this?",
                                              "input_file_ids": [picture]}).json()
    transcript = api_stack.client.get(f"/v1/sessions/{session['id']}", headers=api_stack.auth()).json()["transcript"]
    shown = [i for i in transcript if i["turn"] == asking["turn_index"] and i["kind"] == "image"]
    assert shown[0]["file_id"] == picture and shown[0]["url"]


def test_a_session_created_twice_with_one_key_is_one_session(api_stack: ApiStack) -> None:
    headers = {**api_stack.auth(), "Idempotency-Key": "s-1"}
    once = api_stack.client.post("/v1/sessions", json={"system_prompt": "hi"}, headers=headers)
    twice = api_stack.client.post("/v1/sessions", json={"system_prompt": "hi"}, headers=headers)
    assert once.status_code == twice.status_code == 201 and once.json()["id"] == twice.json()["id"]
    other = api_stack.client.post("/v1/sessions", json={"system_prompt": "other"}, headers=headers)
    assert other.status_code == 409


def test_turns_count_against_the_tenants_waiting_limit(api_stack: ApiStack) -> None:
    with api_stack.session() as s:
        tenants.set_limits(s, api_stack.tenant_id, {"max_waiting_jobs": 1})
    session = _session(api_stack)
    assert _turn(api_stack, session["id"], {"task": "understand", "prompt": "one"}).status_code == 202
    refused = _turn(api_stack, session["id"], {"task": "understand", "prompt": "two"})
    assert refused.status_code == 429 and "max_waiting_jobs" in refused.json()["error"]["message"]


def test_deleting_a_session_deletes_its_turns_and_their_results(api_stack: ApiStack) -> None:
    session = _session(api_stack, {"parts": [{"file_id": api_stack.upload_png()}]})
    turn = _turn(api_stack, session["id"], {"task": "edit", "prompt": "make it blue", "seed": 2}).json()
    store = make_store(api_stack.settings)
    key = output_key(api_stack.tenant_id, turn["id"])
    store.put(key, b"\x89PNG fake result", "image/png")  # as if a worker had finished it
    with api_stack.session() as s:
        s.execute(update(Job).where(Job.id == turn["id"]).values(status="succeeded", output_key=key))
        s.commit()
    objects = set(api_stack.stored_objects())
    assert key in objects or any(o.endswith(key) for o in objects)
    r = api_stack.client.delete(f"/v1/sessions/{session['id']}", headers=api_stack.auth())
    assert r.status_code == 204
    assert key not in api_stack.stored_objects()
    assert api_stack.client.get(f"/v1/sessions/{session['id']}", headers=api_stack.auth()).status_code == 404
    with api_stack.session() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.session_id == session["id"])) == 0
        assert s.get(ModelSession, session["id"]) is None
