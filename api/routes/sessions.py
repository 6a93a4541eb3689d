"""``/v1/sessions``: sessions whose turns see the earlier turns — create one, add a turn (a job),
read the transcript, delete it with its stored results.

Owns: the HTTP form and the checks a turn needs at submission — the files the tenant owns, an
edit needing a picture in the context, the output size (a picture turn takes the size of the
latest picture in the context, as BAGEL's interleaved inference does; without one, ``width`` and
``height``), the context's size against ``session_max_context_tokens`` (a 422
``context_too_long`` naming the count and the limit) and the tenant's limits — all before
anything is stored. A turn is a job: ``GET /v1/jobs/{job_id}`` follows it and its events are the
job events. Leaves the transcript, the context and deletion to ``worker.sessions``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api import idempotency, submission
from api.contract import ACT_ON, CREATE, READ_ONE, WITH_BODY, IdempotencyKey, errors, id_path
from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.schemas import JobOut
from api.session_schemas import SessionIn, SessionOut, TranscriptItem, TurnIn, TurnSummary
from api.views import job_out
from worker import jobs, limits, params, sessions
from worker.errors import ContextTooLong, InvalidParameter, NotFound, UnknownFile
from worker.jobs import JobSpec
from worker.models import File, JobStatus, ModelSession, utcnow
from worker.settings import Settings
from worker.storage import ResultStore

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
ROUTE = "POST /v1/sessions/{session_id}/turns"
CREATE_ROUTE = "POST /v1/sessions"
SESSION_ID = id_path("session", "5e1d2c3b-4a59-4687-9a0b-1c2d3e4f5a6b")


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"session_id: session {session_id!r} not found", field="session_id")


def _load(db: SessionDep, tenant_id: str, session_id: str, *, lock: bool = False) -> ModelSession:
    query = select(ModelSession).where(ModelSession.id == session_id, ModelSession.tenant_id == tenant_id)
    row = db.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise _not_found(session_id)
    return row


def _out(db: SessionDep, row: ModelSession, store: ResultStore, settings: Settings) -> SessionOut:
    parts = sessions.turn_parts(db, row, upto=1 << 30, planned=True)
    items = sessions.transcript(db, row, lambda key: store.url(key, settings.presign_expiry_s))
    return SessionOut(
        id=row.id, system_prompt=row.system_prompt, parts=list(row.parts), metadata=dict(row.meta or {}),
        created_at=row.created_at, max_context_tokens=settings.session_max_context_tokens,
        context_tokens=sessions.context_tokens(settings, parts),
        turns=[TurnSummary(index=j.turn_index, job_id=j.id, task=j.task, status=JobStatus(j.status).value)
               for j in sessions.turns(db, row.id)],
        transcript=[TranscriptItem(**item) for item in items])


@router.post("", status_code=201, response_model=SessionOut, responses=errors(*WITH_BODY), summary="Create a session")
def create_session(body: SessionIn, tenant: TenantDep, db: SessionDep, settings: SettingsDep,
                   store: StoreDep, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """A session: an optional system prompt and opening texts and pictures that every turn sees
    first. Add turns with `POST /v1/sessions/{session_id}/turns`. With an `Idempotency-Key`, a
    retry returns the session the first request created."""
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint(body.model_dump(mode="json"))
    if (previous := idempotency.replay(db, tenant.id, key, CREATE_ROUTE, digest)) is not None:
        return previous
    parts = [part.model_dump(exclude_none=True) for part in body.parts]
    for n, part in enumerate(parts):
        if "text" in part:
            params.check_prompt(part["text"], f"parts[{n}].text")
    row = sessions.create(db, tenant.id, system_prompt=body.system_prompt, parts=parts,
                          metadata=params.check_metadata(body.metadata))
    out = _out(db, row, store, settings)
    if out.context_tokens > settings.session_max_context_tokens:
        raise ContextTooLong(f"parts: the opening is {out.context_tokens} tokens, over the "
                             f"session_max_context_tokens limit of {settings.session_max_context_tokens}",
                             field="parts")
    reply = out.model_dump(mode="json")
    if (winner := idempotency.commit_with_record(db, tenant.id, key, CREATE_ROUTE, digest, 201, reply)) is not None:
        return winner
    return JSONResponse(reply, status_code=201)


@router.get("/{session_id}", response_model=SessionOut, responses=errors(*READ_ONE), summary="Get a session")
def get_session(session_id: Annotated[str, SESSION_ID], tenant: TenantDep, db: SessionDep, settings: SettingsDep,
                store: StoreDep) -> SessionOut:
    """The session, its turns and its transcript (pictures with download URLs)."""
    return _out(db, _load(db, tenant.id, session_id), store, settings)


@router.delete("/{session_id}", status_code=204, response_class=Response, responses=errors(*READ_ONE),
               summary="Delete a session")
def delete_session(session_id: Annotated[str, SESSION_ID], tenant: TenantDep, db: SessionDep,
                   store: StoreDep) -> Response:
    """Delete the session, its turns (a running one stops where it is) and their stored results;
    the input files stay the tenant's."""
    sessions.delete_session(db, store, _load(db, tenant.id, session_id))
    return Response(status_code=204)


@router.post("/{session_id}/turns", status_code=202, response_model=JobOut, responses=errors(*CREATE, *ACT_ON),
             summary="Add a turn")
def add_turn(session_id: Annotated[str, SESSION_ID], body: TurnIn, tenant: TenantDep, db: SessionDep,
             settings: SettingsDep, store: StoreDep, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Queue a turn: a job that sees the session's context — the system prompt, the opening parts,
    every earlier turn's pictures, prompt and output — then its own pictures and prompt. Turns run
    in order: one submitted while an earlier one is unfinished waits for it, and fails
    (`previous_turn_failed`) if that one does. 202 with the turn's job."""
    key = idempotency.check_key(idempotency_key)
    digest = idempotency.fingerprint({"session_id": session_id, **body.model_dump(mode="json")})
    if (previous := idempotency.replay(db, tenant.id, key, ROUTE, digest)) is not None:
        return previous
    row = _load(db, tenant.id, session_id, lock=True)  # turns of one session take their places in order
    spec = _turn_spec(db, settings, row, body)
    webhook_url = submission.check_webhook(settings, body.webhook_url)
    limits.check_submission(db, tenant, new_jobs=1, now=utcnow())
    _, created = jobs.submit(db, tenant.id, [spec], batch=False, webhook_url=webhook_url, metadata=spec.metadata,
                             max_attempts=settings.max_attempts, commit=False)
    out = job_out(created[0], store, settings).model_dump(mode="json")
    if (winner := idempotency.commit_with_record(db, tenant.id, key, ROUTE, digest, 202, out)) is not None:
        return winner
    return JSONResponse(out, status_code=202)


def _turn_spec(db: SessionDep, settings: Settings, row: ModelSession, body: TurnIn) -> JobSpec:
    params.check_prompt(body.prompt)
    files = {f.id: f for f in db.scalars(select(File).where(File.tenant_id == row.tenant_id,
                                                            File.id.in_(set(body.input_file_ids)))).all()}
    for n, fid in enumerate(body.input_file_ids):
        if fid not in files:
            raise UnknownFile(f"input_file_ids[{n}]: file {fid!r} not found", field=f"input_file_ids[{n}]")
    index, after = sessions.turn_place(db, row.id)
    own = [*(sessions.Part(key=files[fid].storage_key, size=(files[fid].width, files[fid].height))
             for fid in body.input_file_ids), sessions.Part(text=body.prompt)]
    context = [*sessions.turn_parts(db, row, upto=index, planned=True), *own]
    user_params = submission.params_dict(body.params)
    if body.seed is not None:
        user_params["seed"] = body.seed
    resolved = params.resolve(body.task, user_params, body.think)
    width = height = None
    if body.task != "understand":
        size = sessions.picture_size(settings, context)
        if size is not None:
            for name, value in (("width", body.width), ("height", body.height)):
                if value is not None:
                    raise InvalidParameter(f"{name}: a picture turn takes the size of the latest picture in the "
                                           "session's context", field=name)
            width, height = size
        elif body.task == "edit":
            raise InvalidParameter("task: edit needs a picture in the session's context (an opening picture, a "
                                   "turn's input_file_ids or a picture an earlier turn made)", field="task")
        else:
            width, height = params.resolve_size("generate", body.width, body.height,
                                                max_side_px=settings.max_output_side_px, input_size=None,
                                                constants=params.picture_constants(settings.model_path))
    tokens = sessions.context_tokens(
        settings, context, output="text" if body.task == "understand" else "image",
        out_size=(width, height) if width else None, answer_tokens=int(resolved.get("max_new_tokens", 0)),
        think_tokens=int(resolved.get("max_think_tokens", 0)) if body.think else 0)
    if tokens > settings.session_max_context_tokens:
        raise ContextTooLong(f"prompt: this turn's context would be {tokens} tokens, its output included, over the "
                             f"session_max_context_tokens limit of {settings.session_max_context_tokens}",
                             field="prompt")
    return JobSpec(task=body.task, prompt=body.prompt, params=resolved, input_file_ids=tuple(body.input_file_ids),
                   think=body.think, width=width, height=height, metadata=params.check_metadata(body.metadata),
                   session_id=row.id, turn_index=index, after_job_id=after)
