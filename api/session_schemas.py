"""Bodies of ``/v1/sessions`` (pydantic): a session, a turn, and the transcript.

Owns: their wire format. Leaves the rules that need the database or the settings (files the
tenant owns, the context's size) to ``worker.sessions`` and the routes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.contract import ID_PATTERN, PROMPT_PATTERN
from api.schemas import GenerationParamsIn, Strict, _side
from worker.params import MAX_PROMPT_CHARS, SEED_MAX
from worker.sessions import MAX_OPENING_PARTS

TurnTask = Literal["understand", "generate", "edit"]
MAX_TURN_FILES = 4


class SessionText(Strict):
    """An opening text."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "This is Mira."}]})

    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, json_schema_extra={"pattern": PROMPT_PATTERN},
                      description="a text")


class SessionPicture(Strict):
    """An opening picture, uploaded first (``POST /v1/files``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"file_id": "f_1"}]})

    file_id: str = Field(min_length=1, max_length=64, json_schema_extra={"pattern": ID_PATTERN},
                         description="a picture, by file id")


class SessionIn(Strict):
    """A session: what every turn sees first."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "system_prompt": "You draw Mira, a small red fox in a green scarf, in a flat cartoon style.",
        "parts": [{"file_id": "f_1"}, {"text": "This is Mira."}], "metadata": {"game": "quest"}}]})

    system_prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS,
                                      json_schema_extra={"pattern": PROMPT_PATTERN},
                                      description="the first text of every turn's context")
    parts: list[SessionText | SessionPicture] = Field(default_factory=list, max_length=MAX_OPENING_PARTS,
                                                      description="opening texts and pictures, in order")
    metadata: dict[str, Any] | None = Field(None, description="your JSON object (at most 16 KiB)")


class TurnIn(Strict):
    """One turn: it sees the system prompt, the opening parts and every earlier turn (their
    pictures, prompts, answers and pictures made), then its own pictures and prompt."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "generate", "prompt": "Mira reading a map in a snowy forest", "seed": 3}]})

    task: TurnTask = Field(description="understand (answers in text), generate (a picture), or edit (a picture "
                           "from the latest one in the context)")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, json_schema_extra={"pattern": PROMPT_PATTERN},
                        description="the question or instruction")
    input_file_ids: list[str] = Field(default_factory=list, max_length=MAX_TURN_FILES, description="pictures this "
                                      "turn adds before its prompt", json_schema_extra={
                                          "items": {"type": "string", "minLength": 1, "pattern": ID_PATTERN}})
    think: bool = Field(False, description="reason in text first")
    width: int | None = _side("width", "generate without a picture in the context")
    height: int | None = _side("height", "generate without a picture in the context")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="shorthand for params.seed")
    params: GenerationParamsIn | None = Field(None, description="hyper-parameters; unset ones take the task's "
                                              "defaults")
    webhook_url: str | None = Field(None, description="where this turn's events go")
    metadata: dict[str, Any] | None = Field(None, description="your JSON object, returned with the turn's job")


class TranscriptItem(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="who said it")
    kind: Literal["text", "image"] = Field(description="a text or a picture")
    text: str | None = Field(None, description="the text")
    file_id: str | None = Field(None, description="a picture the user gave, by file id")
    url: str | None = Field(None, description="a download URL of the picture")
    turn: int | None = Field(None, description="the turn it belongs to; null for the opening")
    job_id: str | None = Field(None, description="that turn's job")


class TurnSummary(BaseModel):
    index: int = Field(description="its place, from 0")
    job_id: str = Field(description="its job (GET /v1/jobs/{job_id})")
    task: TurnTask = Field(description="what it makes")
    status: str = Field(description="its job's status")


class SessionOut(BaseModel):
    """A session with its transcript."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "5e1d2c3b-4a59-4687-9a0b-1c2d3e4f5a6b", "system_prompt": "You draw Mira.", "parts": [{"text": "Hi"}],
        "metadata": {}, "created_at": "2026-11-28T12:00:00Z", "max_context_tokens": 16384, "context_tokens": 12,
        "turns": [{"index": 0, "job_id": "6f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", "task": "generate",
                   "status": "succeeded"}],
        "transcript": [{"role": "system", "kind": "text", "text": "You draw Mira.", "file_id": None, "url": None,
                        "turn": None, "job_id": None}]}]})

    id: str = Field(description="the session's id")
    system_prompt: str | None = Field(description="the first text of every turn's context")
    parts: list[dict[str, str]] = Field(description="the opening parts")
    metadata: dict[str, Any] = Field(description="as given")
    created_at: datetime = Field(description="when it was created")
    max_context_tokens: int = Field(description="the session_max_context_tokens setting: the most a turn's "
                                    "context may reach")
    context_tokens: int = Field(description="the context so far (an upper bound counted without the model)")
    turns: list[TurnSummary] = Field(description="its turns in order")
    transcript: list[TranscriptItem] = Field(description="everything the model has seen and said, in order")
