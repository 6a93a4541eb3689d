"""BAGEL as LangChain tools over a ``Client``: ``bagel_describe`` (a picture and a question →
the answer), ``bagel_imagine`` (a prompt, and a picture to edit → a picture URL) and
``bagel_new_session`` (a session id: a visual context the other two share).

    tools = BagelToolkit(Client(), session=True).get_tools()   # or toolkit(Client(), session=True)
    agent = create_agent(model, tools)  # langchain's, or any loop that runs a chat model's tool calls

Owns: the argument schemas an LLM reads; what an ``image`` argument may be — an uploaded file
id (sent as is), a path to a picture on this machine (uploaded), or a picture URL these tools
returned or that the session's transcript lists (the picture of its job, uploaded once; other
URLs are refused, so an agent cannot make this process fetch arbitrary addresses); whether a
call is a one-off job or a turn of a session (the call's ``session``, else the toolkit's own);
waiting with a per-call timeout, after which the job is canceled; and what the agent reads back.
A success is a JSON object (``image_url`` or ``answer``, ``job_id``, ``session``, ``turn``,
``think`` when asked) with the ``Job`` as the ``ToolMessage``'s artifact. An API error, a job
that did not succeed, a timeout or bad arguments come back as the tool's result text (a
``ToolException`` with ``handle_tool_error``), naming the code and field, never a traceback.

In a session the latest picture of the context is not added to a turn again (it is already
there, and every picture costs context tokens); a picture turn takes that picture's size, and
the toolkit's ``width`` and ``height`` apply only while the session has no picture.

Leaves HTTP, retries and polling to ``bagel_client.Client``. The only module of the SDK that
imports ``langchain_core`` and ``pydantic`` (the ``agents`` extra); ``import bagel_client`` never
loads it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import httpx
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, Field, ValidationError

from bagel_client.client import Client
from bagel_client.errors import ApiError, BagelError, WaitTimeout
from bagel_client.models import GenerationParams, Job, Session, TurnTask

log = logging.getLogger(__name__)

DESCRIBE = "bagel_describe"
IMAGINE = "bagel_imagine"
NEW_SESSION = "bagel_new_session"
DEFAULT_TIMEOUT_S = 120.0
MAX_TIMEOUT_S = 600.0
URL_SCHEMES = ("http://", "https://")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# A picture by where it comes from: ("file", file id) or ("job", the id of the job that made it).
PictureRef: TypeAlias = tuple[Literal["file", "job"], str]

SESSION_HELP = ("a session id from bagel_new_session: the call becomes a turn of that session and sees its "
                "earlier pictures, questions and answers; leave it out for the toolkit's default")
TIMEOUT_HELP = f"seconds to wait for the result, at most {MAX_TIMEOUT_S:g}; leave it out for the usual wait"
IMAGE_HELP = ("the picture: an uploaded file id, a path to a PNG, JPEG or WebP file on this machine, or an "
              "image_url that bagel_imagine returned (or that the session's transcript lists)")


class DescribeArgs(BaseModel):
    """The arguments of ``bagel_describe``."""

    question: str = Field(min_length=1, description="what to ask about the picture")
    image: str | None = Field(None, description=f"{IMAGE_HELP}; in a session it may be left out to ask about the "
                              "pictures already there (the latest one, e.g. one bagel_imagine just made)")
    think: bool = Field(False, description="reason step by step before answering; the reasoning is returned too")
    session: str | None = Field(None, description=SESSION_HELP)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description=TIMEOUT_HELP)


class ImagineArgs(BaseModel):
    """The arguments of ``bagel_imagine``."""

    prompt: str = Field(min_length=1, description="what to draw, or (with image) how to change the picture")
    image: str | None = Field(None, description=f"{IMAGE_HELP}; given: edit this picture instead of drawing a new "
                              "one")
    think: bool = Field(False, description="plan the picture in text first; the plan is returned too")
    session: str | None = Field(None, description=SESSION_HELP)
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description=TIMEOUT_HELP)


class NewSessionArgs(BaseModel):
    """The arguments of ``bagel_new_session``."""

    system_prompt: str | None = Field(None, min_length=1, description="instructions every turn of the session "
                                      "sees first (a style, a character to keep)")


@dataclass(frozen=True)
class _Context:
    """What a call needs to know of a session: the pictures its context holds, by their URLs
    without the query (signatures change at each read), and the latest one."""

    by_url: dict[str, PictureRef]
    latest: PictureRef | None


class BagelToolkit:
    """The BAGEL tools over ``client``. ``session``: False, calls without a ``session`` argument
    are one-off jobs; True, they are turns of a session the toolkit creates at its first such
    call (``session_id``); a session id, turns of that one. ``timeout_s``: how long a call waits
    unless it says otherwise. ``width`` and ``height``: the size of a new picture with nothing to
    take it from (the service's default when None). ``imagine_params`` and ``describe_params``:
    BAGEL hyper-parameters of every call (e.g. ``{"num_timesteps": 25}``, ``{"max_new_tokens": 256}``).
    Thread-safe as ``Client`` is; an async agent runs the tools in a thread."""

    def __init__(self, client: Client, *, session: bool | str = False, timeout_s: float = DEFAULT_TIMEOUT_S,
                 poll_s: float = 0.25, width: int | None = None, height: int | None = None,
                 imagine_params: GenerationParams | None = None,
                 describe_params: GenerationParams | None = None) -> None:
        if not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s: {timeout_s} must be > 0 and at most {MAX_TIMEOUT_S:g}")
        self.client = client
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.width, self.height = width, height
        self.imagine_params = imagine_params
        self.describe_params = describe_params
        self._create_session = session is True
        self._session_id = session if isinstance(session, str) else None
        self._lock = threading.Lock()
        self._made: dict[str, str] = {}  # URL without its query -> the job that made the picture
        self._uploaded: dict[str, str] = {}  # job id -> the file its picture was uploaded as

    @property
    def session_id(self) -> str | None:
        """The toolkit's own session (None until a call needed it, or without one)."""
        return self._session_id

    def get_tools(self) -> list[BaseTool]:
        """``bagel_describe``, ``bagel_imagine`` and ``bagel_new_session``, ready for an agent."""
        return [
            _tool(self.describe, DESCRIBE, DescribeArgs, "Look at a picture with BAGEL and answer a question about "
                  "it (what it shows, its colours, text in it, how two things relate). Returns JSON: answer, "
                  "job_id, session, turn, and think (the reasoning) when think is true."),
            _tool(self.imagine, IMAGINE, ImagineArgs, "Draw a picture with BAGEL from a text prompt, or edit a "
                  "picture when image is given. Returns JSON: image_url (a PNG download link that expires), "
                  "job_id, session, turn, size, and think (the plan) when think is true. Pass image_url as "
                  "image to bagel_describe or to bagel_imagine to edit it again."),
            _tool(self.new_session, NEW_SESSION, NewSessionArgs, "Start a BAGEL session: a shared visual "
                  "context in which every bagel_imagine and bagel_describe call that names it sees the pictures, "
                  "prompts and answers of the earlier ones (keep a character or a style across pictures). Returns "
                  "JSON: session (pass it as session)."),
        ]

    # The tools' functions: (the text the agent reads, the artifact); ToolException on failure.

    def describe(self, question: str, image: str | None = None, think: bool = False, session: str | None = None,
                 timeout_s: float | None = None) -> tuple[str, Job]:
        """``bagel_describe``: an understand job, or turn, on ``image`` (or the session's context)."""
        with _readable_errors(DESCRIBE, self.client.base_url):
            session_id = self._session(session)
            context = self._context(session_id) if image is not None else None
            if image is None and session_id is None:
                raise ToolException("image: give a picture to describe (a file id, a local "
                                    "path or an image_url), or a session that holds one")
            files = self._input_files(image, context)
            if session_id is None:
                job = self.client.submit_job("understand", question, input_files=files, think=think,
                                             params=self.describe_params)
            else:
                job = self.client.add_turn(session_id, "understand", question, input_files=files, think=think,
                                           params=self.describe_params)
            job = self._wait(DESCRIBE, job, timeout_s)
            assert job.result is not None  # a succeeded job has its result
            reply: dict[str, Any] = {"answer": job.result.text or "", **_place(job)}
            if think:
                reply["think"] = job.result.think_text or ""
            return json.dumps(reply, ensure_ascii=False), job

    def imagine(self, prompt: str, image: str | None = None, think: bool = False, session: str | None = None,
                timeout_s: float | None = None) -> tuple[str, Job]:
        """``bagel_imagine``: a generate job, or turn; an edit one when ``image`` is given."""
        with _readable_errors(IMAGINE, self.client.base_url):
            session_id = self._session(session)
            context = self._context(session_id)
            files = self._input_files(image, context)
            task: TurnTask = "generate" if image is None else "edit"
            # A picture in the session (or the one to edit) sets the size; the toolkit's only without one.
            sized = task == "generate" and (context is None or context.latest is None)
            width, height = (self.width, self.height) if sized else (None, None)
            if session_id is None:
                job = self.client.submit_job(task, prompt, input_files=files, think=think, width=width,
                                             height=height, params=self.imagine_params)
            else:
                job = self.client.add_turn(session_id, task, prompt, input_files=files, think=think, width=width,
                                           height=height, params=self.imagine_params)
            job = self._wait(IMAGINE, job, timeout_s)
            assert job.result is not None  # a succeeded job has its result
            if job.result.url is None:
                raise ToolException(f"job {job.id} succeeded but its picture has no download URL "
                                    f"(expired: {job.result.expired})")
            self._made[_url_path(job.result.url)] = job.id
            reply: dict[str, Any] = {"image_url": job.result.url, **_place(job), "size": f"{job.width}x{job.height}"}
            if think:
                reply["think"] = job.result.think_text or ""
            return json.dumps(reply, ensure_ascii=False), job

    def new_session(self, system_prompt: str | None = None) -> tuple[str, Session]:
        """``bagel_new_session``: a new session's id."""
        with _readable_errors(NEW_SESSION, self.client.base_url):
            created = self.client.create_session(system_prompt=system_prompt)
            return json.dumps({"session": created.id}), created

    # Helpers of the tools

    def _session(self, given: str | None) -> str | None:
        """The session a call runs in: its own, else the toolkit's (created at first need)."""
        if given is not None:
            return given
        with self._lock:
            if self._session_id is None and self._create_session:
                self._session_id = self.client.create_session(metadata={"created_by": "bagel_client.agents"}).id
                log.info("agent session %s created", self._session_id)
            return self._session_id

    def _context(self, session_id: str | None) -> _Context | None:
        """The pictures in the session's context: the opening ones and those of succeeded turns
        (a failed or canceled turn is left out of the context, as the service does)."""
        if session_id is None:
            return None
        session = self.client.get_session(session_id)
        succeeded = {t.index for t in session.turns if t.status == "succeeded"}
        by_url: dict[str, PictureRef] = {}
        latest: PictureRef | None = None
        for item in session.transcript:
            if item.kind != "image" or (item.turn is not None and item.turn not in succeeded):
                continue
            ref: PictureRef | None = ("file", item.file_id) if item.file_id else (
                ("job", item.job_id) if item.job_id else None)
            if ref is None:
                continue
            latest = ref
            if item.url:
                by_url[_url_path(item.url)] = ref
        return _Context(by_url, latest)

    def _input_files(self, image: str | None, context: _Context | None) -> list[str]:
        """The file ids a call adds for ``image``: none for the session's latest picture."""
        if image is None:
            return []
        ref = self._picture(image, context)
        if context is not None and ref == context.latest:
            return []
        kind, ident = ref
        if kind == "file":
            return [ident]
        if ident not in self._uploaded:
            self._uploaded[ident] = self.client.upload(self.client.result_bytes(ident), filename=f"{ident}.png").id
        return [self._uploaded[ident]]

    def _picture(self, image: str, context: _Context | None) -> PictureRef:
        """What ``image`` names (see the module docstring); a local file is uploaded here."""
        if image.startswith(URL_SCHEMES):
            where = _url_path(image)
            if where in self._made:
                return "job", self._made[where]
            if context is not None and where in context.by_url:
                return context.by_url[where]
            raise ToolException(f"image: {where} is not a picture these tools made or one in the "
                                "session's transcript; give a file id or a local path instead")
        local = Path(image).expanduser()
        if local.is_file():
            return "file", self.client.upload(local).id
        if "/" in image or "\\" in image or image.lower().endswith(PICTURE_SUFFIXES):
            raise ToolException(f"image: no file at {image!r} on this machine (give a file id, a local path or an "
                                "image_url bagel_imagine returned)")
        return "file", image  # a file id: the API says whether the tenant has it

    def _wait(self, tool: str, job: Job, timeout_s: float | None) -> Job:
        """The job once it succeeded; ToolException when it did not, or did not in time (it is
        then canceled, so a session goes on without it)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            job = self.client.wait(job, timeout_s=limit, poll_s=self.poll_s, max_poll_s=max(self.poll_s, 2.0))
        except WaitTimeout as exc:
            job = self._cancel(exc.last)
            if job.status != "succeeded":
                log.warning("%s: job %s not finished within %s s, canceled", tool, job.id, limit)
                done = "it was canceled" if job.status == "canceled" else "its cancel was requested"
                raise _TimedOut(f"{exc}; {done} (a canceled turn is left out of its session). Call again with a "
                                f"larger timeout_s (at most {MAX_TIMEOUT_S:g})") from exc
        if job.status != "succeeded":
            error = f"{job.error.code}: {job.error.message}" if job.error else "no error recorded"
            raise ToolException(f"job {job.id} ended {job.status} ({error})")
        return job

    def _cancel(self, job: Job) -> Job:
        """Cancel a job past its wait; it may have finished meanwhile (then it is read back)."""
        try:
            return self.client.cancel_job(job)
        except ApiError:
            return self.client.get_job(job.id)


def toolkit(client: Client, **options: Any) -> list[BaseTool]:
    """The BAGEL tools for an agent: ``BagelToolkit(client, **options).get_tools()``."""
    return BagelToolkit(client, **options).get_tools()


class _TimedOut(ToolException):
    """Raised when a tool's job did not finish within the call's timeout (it was canceled)."""


@contextmanager
def _readable_errors(tool: str, base_url: str) -> Iterator[None]:
    """Turn the SDK's failures inside a tool call into a ``ToolException`` an agent reads as the
    result, ``<tool> failed: …`` (``timed out``): an API error with its status, code and field;
    the service out of reach; a local file that cannot be read."""
    try:
        yield
    except _TimedOut as exc:
        raise _TimedOut(f"{tool} timed out: {exc}") from exc
    except ToolException as exc:
        raise ToolException(f"{tool} failed: {exc}") from exc
    except ApiError as exc:
        where = f" (field {exc.field})" if exc.field else ""
        raise ToolException(f"{tool} failed: HTTP {exc.status} {exc.code}{where}: {exc.message}") from exc
    except BagelError as exc:
        raise ToolException(f"{tool} failed: {exc.code}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise ToolException(f"{tool} failed: the service at {base_url} did not answer "
                            f"({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise ToolException(f"{tool} failed: image: {exc}") from exc


def _tool(func: Callable[..., Any], name: str, schema: type[BaseModel], description: str) -> BaseTool:
    return StructuredTool.from_function(func=func, name=name, description=description, args_schema=schema,
                                       response_format="content_and_artifact", handle_tool_error=True,
                                       handle_validation_error=_invalid_arguments(name))


def _invalid_arguments(tool: str) -> Callable[[ValidationError], str]:
    def message(error: ValidationError) -> str:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                             for e in error.errors())
        return f"{tool} failed: invalid arguments: {problems}"

    return message


def _place(job: Job) -> dict[str, Any]:
    return {"job_id": job.id, "session": job.session_id, "turn": job.turn_index}


def _url_path(url: str) -> str:
    return url.split("?", 1)[0]
