"""Sessions: a tenant's conversation with the model, whose turns see the earlier turns.

Owns: the session row and its opening parts (``create``), a turn's place (``turn_spec_fields``:
its index and the earlier turn it waits for — turns run in order), the context's size against
``session_max_context_tokens`` (``context_tokens``: an upper bound counted without the model —
a text's UTF-8 bytes, since a byte-level BPE never makes more tokens than bytes, plus its two
markers; a picture's VAE and ViT blocks at the sizes the model resizes it to), the transcript
(``transcript``: system prompt, opening parts, then per turn its pictures, its prompt and its
output), the parts a GPU worker rebuilds a turn's context from (``turn_parts``: every earlier
turn verbatim, then the turn's own pictures and prompt), and deleting a session with its
stored objects (``delete``). Torch-free. Leaves the HTTP form to ``api.routes.sessions``, the
engine's interleaved requests and the context cache to ``worker.gpu``, a turn's state changes
to ``worker.jobs`` and ``worker.transitions``.

A turn is a job (``Job.session_id``, ``turn_index``): its task says what it makes — understand
(text), generate or edit (a picture; edit needs a picture in the context). Its own pictures
(``input_file_ids``) come before its prompt. An earlier turn's output joins the context as its
answer text or its picture; an earlier turn that did not succeed is left out of the transcript
and of the context, and a turn waiting on it fails (``previous_turn_failed``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from bagel.sizes import vae_size
from worker.errors import InvalidParameter, ObjectNotFound, UnknownFile
from worker.models import File, Job, JobStatus, ModelSession, new_id, result_keys, utcnow
from worker.params import picture_constants

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.settings import Settings
    from worker.storage import ResultStore

log = logging.getLogger(__name__)

MAX_OPENING_PARTS = 16
MAX_TEXT_CHARS = 8000
TEXT_MARKERS = 2  # <|im_start|> … <|im_end|>
PICTURE_MARKERS = 2  # <|vision_start|> … <|vision_end|> around each block
VIT_PATCH_PX = 14
LATENT_STRIDE_PX = 16  # the VAE's 8× downsampling, 2×2 latent patches
IMAGE_TASKS = ("generate", "edit")
TURN_TASKS = ("understand", *IMAGE_TASKS)


@dataclass(frozen=True)
class Part:
    """One part of a context: a text, or a picture (a stored object) seen by the understanding
    path, the generation path or both."""

    text: str | None = None
    key: str | None = None  # the picture's storage key ("pending:<job id>" for one not made yet)
    size: tuple[int, int] | None = None  # the picture's (width, height) px
    tokens: int | None = None  # an answer not given yet: its token budget


def create(session: Session, tenant_id: str, *, system_prompt: str | None, parts: Sequence[dict[str, str]],
           metadata: dict[str, Any]) -> ModelSession:
    """A new session (flushed, not committed); the opening parts' files must be the tenant's."""
    if len(parts) > MAX_OPENING_PARTS:
        raise InvalidParameter(f"parts: {len(parts)} parts exceed the {MAX_OPENING_PARTS} part limit", field="parts")
    wanted = [p["file_id"] for p in parts if "file_id" in p]
    owned = _files(session, tenant_id, wanted)
    for n, part in enumerate(parts):
        if "file_id" in part and part["file_id"] not in owned:
            raise UnknownFile(f"parts[{n}].file_id: file {part['file_id']!r} not found", field=f"parts[{n}].file_id")
    now = utcnow()
    row = ModelSession(id=new_id(), tenant_id=tenant_id, system_prompt=system_prompt, parts=list(parts), meta=metadata,
                  created_at=now, updated_at=now)
    session.add(row)
    session.flush()
    return row


def turns(session: Session, session_id: str) -> list[Job]:
    """The session's turns in order."""
    return list(session.scalars(select(Job).where(Job.session_id == session_id).order_by(Job.turn_index)).all())


def turn_place(session: Session, session_id: str) -> tuple[int, str | None]:
    """The next turn's index and the earlier turn it must wait for (None: none unfinished)."""
    rows = session.execute(select(Job.id, Job.turn_index, Job.status).where(Job.session_id == session_id)
                           .order_by(Job.turn_index.desc()).limit(1)).all()
    if not rows:
        return 0, None
    last_id, last_index, status = rows[0]
    return last_index + 1, (last_id if JobStatus(status) in (JobStatus.queued, JobStatus.running) else None)


def context_tokens(settings: Settings, parts: Sequence[Part], *, output: str | None = None,
                   out_size: tuple[int, int] | None = None, answer_tokens: int = 0, think_tokens: int = 0) -> int:
    """The upper bound of a turn's context, its output included (see the module docstring);
    without ``output``, the parts alone."""
    consts = picture_constants(settings.model_path)
    stride = LATENT_STRIDE_PX
    total = 0
    for part in parts:
        if part.text is not None:
            total += len(part.text.encode()) + TEXT_MARKERS
        elif part.tokens is not None:
            total += part.tokens + TEXT_MARKERS
        else:
            assert part.size is not None
            w, h = vae_size(*part.size, consts)
            side = consts.vit_max_num_patch_per_side
            vit = min(math.ceil(w / VIT_PATCH_PX), side) * min(math.ceil(h / VIT_PATCH_PX), side)
            total += (w // stride) * (h // stride) + vit + 2 * PICTURE_MARKERS
    if output == "text":
        total += answer_tokens + TEXT_MARKERS
    elif output == "image":
        assert out_size is not None
        total += (out_size[0] // stride) * (out_size[1] // stride) + PICTURE_MARKERS
    return total + (think_tokens + TEXT_MARKERS if think_tokens else 0)


def opening(session: Session, row: ModelSession) -> list[Part]:
    """The system prompt and the opening parts."""
    files = _files(session, row.tenant_id, [p["file_id"] for p in row.parts if "file_id" in p])
    out = [Part(text=row.system_prompt)] if row.system_prompt else []
    for part in row.parts:
        if "text" in part:
            out.append(Part(text=part["text"]))
        else:
            f = files[part["file_id"]]
            out.append(Part(key=f.storage_key, size=(f.width, f.height)))
    return out


def turn_parts(session: Session, row: ModelSession, upto: int, own: Job | None = None, *,
               planned: bool = False) -> list[Part]:
    """The context of turn ``upto``: the opening, every earlier turn that succeeded verbatim (its
    pictures, its prompt, its output), then ``own``'s pictures and prompt when given. With
    ``planned`` (at submission), earlier turns still waiting or running count too, their outputs
    as what they will make: a picture of their size, an answer of their token budget."""
    parts = opening(session, row)
    earlier = [job for job in turns(session, row.id) if job.turn_index < upto]
    files = _files(session, row.tenant_id, [fid for job in [*earlier, *([own] if own else [])]
                                             for fid in job.input_file_ids])
    for job in earlier:
        status = JobStatus(job.status)
        if planned and status in (JobStatus.queued, JobStatus.running):
            parts += _asked(job, files)
            parts.append(Part(tokens=int(job.params.get("max_new_tokens", 0))) if job.task == "understand"
                         else Part(key=f"pending:{job.id}", size=(job.width, job.height)))
            continue
        if status != JobStatus.succeeded or job.result_expired_at is not None:
            continue
        parts += _asked(job, files)
        parts.append(Part(text=job.output_text or "") if job.task == "understand"
                     else Part(key=job.output_key, size=(job.width, job.height)))
    if own is not None:
        parts += _asked(own, files)
    return parts


def picture_size(settings: Settings, parts: Sequence[Part]) -> tuple[int, int] | None:
    """The size a picture turn makes: the latest picture's in the context, as the model resizes
    it (BAGEL's interleaved inference); None without a picture."""
    pictures = [p for p in parts if p.key is not None]
    if not pictures:
        return None
    assert pictures[-1].size is not None
    return vae_size(*pictures[-1].size, picture_constants(settings.model_path))


def transcript(session: Session, row: ModelSession, url: Callable[[str], str]) -> list[dict[str, Any]]:
    """Everything the model has seen and said, in order, with download URLs for pictures: the
    opening, then each turn that succeeded or is still to run (its pictures and prompt, and once
    it succeeded its answer or picture)."""
    items: list[dict[str, Any]] = []
    if row.system_prompt:
        items.append({"role": "system", "kind": "text", "text": row.system_prompt})
    files = _files(session, row.tenant_id, [p["file_id"] for p in row.parts if "file_id" in p])
    for part in row.parts:
        if "text" in part:
            items.append({"role": "user", "kind": "text", "text": part["text"]})
        else:
            items.append({"role": "user", "kind": "image", "file_id": part["file_id"],
                          "url": url(files[part["file_id"]].storage_key)})
    asked = _files(session, row.tenant_id, [fid for job in turns(session, row.id) for fid in job.input_file_ids])
    for job in turns(session, row.id):
        status = JobStatus(job.status)
        if status not in (JobStatus.succeeded, JobStatus.queued, JobStatus.running):
            continue  # it ended without a result: no later turn sees it (``turns`` lists it)
        base = {"turn": job.turn_index, "job_id": job.id}
        for fid in job.input_file_ids:
            items.append({**base, "role": "user", "kind": "image", "file_id": fid,
                          "url": url(asked[fid].storage_key) if fid in asked else None})
        items.append({**base, "role": "user", "kind": "text", "text": job.prompt})
        if status != JobStatus.succeeded or job.result_expired_at is not None:
            continue
        if job.task == "understand":
            items.append({**base, "role": "assistant", "kind": "text", "text": job.output_text or ""})
        elif job.output_key:
            items.append({**base, "role": "assistant", "kind": "image", "url": url(job.output_key)})
    return items


def delete_session(session: Session, store: ResultStore, row: ModelSession) -> int:
    """Delete the session, its turns and their stored results (the turns' input files stay the
    tenant's). Returns how many objects were deleted. Commits."""
    keys = {key for job in turns(session, row.id) for key in result_keys(job.output_key, job.quality)}
    for key in sorted(keys):
        store.delete(key)
    session.execute(delete(ModelSession).where(ModelSession.id == row.id))
    session.commit()
    log.info("session %s deleted with %d stored result(s)", row.id, len(keys))
    return len(keys)


def _asked(job: Job, files: dict[str, File]) -> list[Part]:
    return [*(Part(key=files[fid].storage_key, size=(files[fid].width, files[fid].height))
              for fid in job.input_file_ids if fid in files), Part(text=job.prompt)]


def _files(session: Session, tenant_id: str, ids: Sequence[str]) -> dict[str, File]:
    if not ids:
        return {}
    return {f.id: f for f in session.scalars(select(File).where(File.tenant_id == tenant_id,
                                                                File.id.in_(set(ids)))).all()}


def context_parts(session: Session, store: ResultStore, job: Job) -> list[tuple[str, Any]]:
    """A turn's context as a GPU worker runs it: ``("text", str)`` and ``("image", bytes)`` in
    order, each stored picture read once. Raises ``ObjectNotFound`` when one is gone, and
    ``StorageUnavailable`` when storage does not answer."""
    row = session.get(ModelSession, job.session_id)
    if row is None:
        raise ObjectNotFound(f"session {job.session_id} was deleted")
    read: dict[str, bytes] = {}
    out: list[tuple[str, Any]] = []
    for part in turn_parts(session, row, job.turn_index, own=job):
        if part.text is not None:
            out.append(("text", part.text))
        else:
            assert part.key is not None
            if part.key not in read:
                read[part.key] = store.get(part.key)
            out.append(("image", read[part.key]))
    return out
