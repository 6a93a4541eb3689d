"""What the API returns and takes, as plain typed Python: frozen dataclasses for the answers
(``File``, ``Job``, ``Batch``, ``Share``, ``Delivery``, ``Adapter``, ``Provenance``, ``Session``
and their parts, among them a job's quality-gate record ``Quality`` and a session's ``Turn`` and
``TranscriptItem``), TypedDicts for the inputs (``GenerationParams``, ``BatchItem``,
``QualityGateParams``, ``SessionPart``) and the frozen ``QualityGate``.

Owns: reading the JSON bodies of ``api/schemas.py`` (``FileOut``, ``JobOut``, ``BatchOut``,
``DeliveryOut``), ``api/quality_schemas.py`` (``QualityOut``), ``api/share.py`` (``ShareOut``),
``api/routes/adapters.py`` (``AdapterOut``), ``api/routes/provenance.py`` (``Provenance``) and
``api/session_schemas.py`` (``SessionOut``) into these types. Fields the SDK does not know yet are ignored, and every object keeps the body
it was read from in ``raw``. Leaves the HTTP calls to the clients.
No pydantic: the SDK depends on httpx and standardwebhooks only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Required, TypedDict

Task = Literal["generate", "edit", "understand", "tryon"]
TurnTask = Literal["understand", "generate", "edit"]
Priority = Literal["interactive", "batch"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "expired"})


class GenerationParams(TypedDict, total=False):
    """BAGEL hyper-parameters of a job (``params``); anything left out takes the task's default."""

    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    timestep_shift: float
    num_timesteps: int
    cfg_renorm_min: float
    cfg_renorm_type: Literal["global", "channel", "text_channel"]
    max_think_tokens: int
    max_new_tokens: int
    do_sample: bool
    text_temperature: float
    seed: int
    taylorseer: bool


class QualityGateParams(TypedDict, total=False):
    """A job's quality gate as a dict (``quality_gate=``); see ``QualityGate``."""

    threshold: float
    max_regenerations: int


@dataclass(frozen=True)
class QualityGate:
    """Opt in to the quality gate (generate, edit and tryon): BAGEL answers yes/no questions about
    its own picture, the score is the mean P(yes); below ``threshold`` (0.0..1.0) the job is made
    again with the next seed, up to ``max_regenerations`` (0..4) times, each counted in
    GPU-seconds, and the best attempt is the result. The API checks the ranges."""

    threshold: float = 0.5
    max_regenerations: int = 2


class BatchItem(TypedDict, total=False):
    """One item of ``submit_batch``; unset fields take the batch's values (``quality_gate``: over
    the batch's)."""

    prompt: Required[str]
    task: Task
    input_file_ids: list[str]
    think: bool
    width: int
    height: int
    seed: int
    params: GenerationParams
    quality_gate: QualityGateParams | QualityGate
    metadata: dict[str, Any]


class SessionPart(TypedDict, total=False):
    """An opening part of ``create_session`` in its wire form: ``{"text": ...}`` or
    ``{"file_id": ...}`` (an uploaded picture), exactly one of the two."""

    text: str
    file_id: str


def parse_datetime(value: str | None) -> datetime | None:
    """An ISO 8601 time of the API (``…Z`` or ``…+00:00``) as an aware datetime."""
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class File:
    """An uploaded input image (``POST /v1/files``)."""

    id: str
    sha256: str
    content_type: str
    format: str
    width: int
    height: int
    size_bytes: int
    filename: str | None
    created_at: datetime
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> File:
        return cls(id=body["id"], sha256=body["sha256"], content_type=body["content_type"], format=body["format"],
                   width=body["width"], height=body["height"], size_bytes=body["size_bytes"],
                   filename=body.get("filename"), created_at=datetime.fromisoformat(body["created_at"]), raw=body)


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable ``code`` and a message."""

    code: str
    message: str | None


@dataclass(frozen=True)
class Progress:
    """Denoising steps done of ``total`` (0 for understand jobs)."""

    step: int
    total: int


@dataclass(frozen=True)
class Timings:
    """When a job was queued, started and finished; its share of the engine call
    (``model_seconds``) and of its chunks' GPU time (``gpu_seconds``); seconds per phase."""

    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model_seconds: float | None
    gpu_seconds: float | None
    phases: dict[str, float]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Timings:
        return cls(queued_at=datetime.fromisoformat(body["queued_at"]),
                   started_at=parse_datetime(body.get("started_at")),
                   finished_at=parse_datetime(body.get("finished_at")), model_seconds=body.get("model_seconds"),
                   gpu_seconds=body.get("gpu_seconds"), phases=dict(body.get("phases") or {}))


@dataclass(frozen=True)
class Result:
    """A succeeded job's output: ``url`` (presigned S3 or signed API URL, valid until
    ``url_expires_at``) for images, ``text`` for answers, ``think_text`` in think mode.
    ``expired``: the stored image was deleted after the retention period."""

    url: str | None
    url_expires_at: datetime | None
    content_type: str | None
    text: str | None
    think_text: str | None
    expired: bool

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Result:
        return cls(url=body.get("url"), url_expires_at=parse_datetime(body.get("url_expires_at")),
                   content_type=body.get("content_type"), text=body.get("text"), think_text=body.get("think_text"),
                   expired=bool(body.get("expired", False)))


@dataclass(frozen=True)
class Queue:
    """Where an active job or batch stands: jobs dispatched before it, and the expected finish."""

    position: int
    tenant_position: int
    eta_s: float | None
    eta_at: datetime | None
    live_workers: int

    @classmethod
    def from_json(cls, body: dict[str, Any] | None) -> Queue | None:
        if body is None:
            return None
        return cls(position=body["position"], tenant_position=body["tenant_position"], eta_s=body.get("eta_s"),
                   eta_at=parse_datetime(body.get("eta_at")), live_workers=body["live_workers"])


@dataclass(frozen=True)
class QualityAnswer:
    """One question the quality gate asked about an attempt: ``p_yes`` is
    P(yes) / (P(yes) + P(no)) of the answer's first token, from ``yes_prob`` and ``no_prob``."""

    question: str
    p_yes: float
    yes_prob: float
    no_prob: float

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> QualityAnswer:
        return cls(question=body["question"], p_yes=body["p_yes"], yes_prob=body["yes_prob"],
                   no_prob=body["no_prob"])


@dataclass(frozen=True)
class QualityAttempt:
    """One picture the quality gate judged: its seed, score (the mean ``p_yes``), answers, and a
    download URL (None once the result expired)."""

    seed: int
    score: float
    answers: list[QualityAnswer]
    url: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> QualityAttempt:
        return cls(seed=body["seed"], score=body["score"],
                   answers=[QualityAnswer.from_json(a) for a in body.get("answers") or []], url=body.get("url"))


@dataclass(frozen=True)
class Quality:
    """The quality gate's record of a succeeded job that asked for it: the verdict (``gate``:
    ``passed``, or ``best_effort`` when no attempt reached ``threshold``), the result's
    ``score``, every attempt in order (the seed given, then the next ones) and which one is the
    result (``chosen``); ``questions_version``: ``builtin-N`` or ``tenant-<hash>``."""

    gate: str
    score: float
    threshold: float
    max_regenerations: int
    questions_version: str
    chosen: int
    attempts: list[QualityAttempt]

    @classmethod
    def from_json(cls, body: dict[str, Any] | None) -> Quality | None:
        if body is None:
            return None
        return cls(gate=body["gate"], score=body["score"], threshold=body["threshold"],
                   max_regenerations=body["max_regenerations"], questions_version=body["questions_version"],
                   chosen=body["chosen"], attempts=[QualityAttempt.from_json(a) for a in body.get("attempts") or []])


@dataclass(frozen=True)
class Job:
    """One job (``GET /v1/jobs/{id}``): one image, or one answer for ``understand``. ``adapter``:
    the LoRA adapter it runs with (its scale is ``params["adapter_scale"]``), None for the base
    model; ``rerun_of``: the job it re-runs, None for a job submitted on its own. ``dedupe``:
    ``hit`` (answered at submission from the identical job ``dedupe_of``, no GPU time),
    ``waiting`` (waits on ``dedupe_of``, still running), ``miss`` (runs itself), None (it does not
    qualify: no seed given, the tenant opted out, a re-run); ``quality``: the quality gate's
    record, once a job that asked for it succeeded. ``session_id`` and ``turn_index``: the session
    it is a turn of (``add_turn``) and its place there from 0, None for a job on its own."""

    id: str
    batch_id: str | None
    position: int
    task: str
    status: str
    prompt: str
    input_file_ids: list[str]
    think: bool
    width: int | None
    height: int | None
    params: dict[str, Any]
    adapter: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: JobError | None
    progress: Progress
    timings: Timings
    result: Result | None
    metadata: dict[str, Any]
    webhook_url: str | None
    created_at: datetime
    priority: str
    deadline_at: datetime | None
    queue: Queue | None
    rerun_of: str | None
    dedupe: str | None
    dedupe_of: str | None
    quality: Quality | None
    session_id: str | None
    turn_index: int | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def is_terminal(self) -> bool:
        """Succeeded, failed, canceled or expired: it will not change any more."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        error = body.get("error")
        result = body.get("result")
        return cls(
            id=body["id"], batch_id=body.get("batch_id"), position=body.get("position", 0), task=body["task"],
            status=body["status"], prompt=body["prompt"], input_file_ids=list(body.get("input_file_ids") or []),
            think=bool(body.get("think")), width=body.get("width"), height=body.get("height"),
            params=dict(body.get("params") or {}), adapter=body.get("adapter"),
            attempts=body.get("attempts", 0), max_attempts=body.get("max_attempts", 0),
            cancel_requested=bool(body.get("cancel_requested")),
            error=None if error is None else JobError(code=error["code"], message=error.get("message")),
            progress=Progress(step=body["progress"]["step"], total=body["progress"]["total"]),
            timings=Timings.from_json(body["timings"]),
            result=None if result is None else Result.from_json(result), metadata=dict(body.get("metadata") or {}),
            webhook_url=body.get("webhook_url"), created_at=datetime.fromisoformat(body["created_at"]),
            priority=body.get("priority", "batch"), deadline_at=parse_datetime(body.get("deadline_at")),
            queue=Queue.from_json(body.get("queue")), rerun_of=body.get("rerun_of"), dedupe=body.get("dedupe"),
            dedupe_of=body.get("dedupe_of"), quality=Quality.from_json(body.get("quality")),
            session_id=body.get("session_id"), turn_index=body.get("turn_index"), raw=body)


@dataclass(frozen=True)
class Batch:
    """Many jobs submitted together (``GET /v1/batches/{id}``). ``job_ids`` (in item order) is
    only in the answer to the submission; ``counts`` has every job status, zeros included."""

    id: str
    status: str
    job_count: int
    counts: dict[str, int]
    progress: float
    cancel_requested: bool
    webhook_url: str | None
    metadata: dict[str, Any]
    created_at: datetime
    completed_at: datetime | None
    job_ids: list[str] | None
    priority: str
    deadline_at: datetime | None
    gpu_seconds: float
    queue: Queue | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def is_completed(self) -> bool:
        """No job is left queued or running."""
        return self.completed_at is not None

    @property
    def finished(self) -> int:
        """Jobs that reached a final status (succeeded, failed, canceled or expired)."""
        return sum(n for status, n in self.counts.items() if status in TERMINAL_STATUSES)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Batch:
        job_ids = body.get("job_ids")
        return cls(
            id=body["id"], status=body["status"], job_count=body["job_count"], counts=dict(body.get("counts") or {}),
            progress=float(body.get("progress", 0.0)), cancel_requested=bool(body.get("cancel_requested")),
            webhook_url=body.get("webhook_url"), metadata=dict(body.get("metadata") or {}),
            created_at=datetime.fromisoformat(body["created_at"]),
            completed_at=parse_datetime(body.get("completed_at")),
            job_ids=None if job_ids is None else list(job_ids), priority=body.get("priority", "batch"),
            deadline_at=parse_datetime(body.get("deadline_at")), gpu_seconds=float(body.get("gpu_seconds") or 0.0),
            queue=Queue.from_json(body.get("queue")), raw=body)


@dataclass(frozen=True)
class Turn:
    """One turn of a session: its place (from 0), its job (``get_job``, ``wait``), what it makes
    and its job's status."""

    index: int
    job_id: str
    task: str
    status: str


@dataclass(frozen=True)
class TranscriptItem:
    """One thing a session's model has seen or said, in order: ``role`` (system, user or
    assistant), ``kind`` (text or image), the ``text``, a picture's ``file_id`` (one the user
    gave) and download ``url`` (minted at each read), and the ``turn`` and ``job_id`` it belongs
    to (None for the system prompt and the opening parts)."""

    role: str
    kind: str
    text: str | None
    file_id: str | None
    url: str | None
    turn: int | None
    job_id: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TranscriptItem:
        return cls(role=body["role"], kind=body["kind"], text=body.get("text"), file_id=body.get("file_id"),
                   url=body.get("url"), turn=body.get("turn"), job_id=body.get("job_id"))


@dataclass(frozen=True)
class Session:
    """A session (``GET /v1/sessions/{id}``): the system prompt and opening ``parts`` every turn
    sees first, its ``turns`` in order and the ``transcript`` (pictures with download URLs).
    ``context_tokens`` is the context so far, an upper bound, against ``max_context_tokens``."""

    id: str
    system_prompt: str | None
    parts: list[SessionPart]
    metadata: dict[str, Any]
    created_at: datetime
    max_context_tokens: int
    context_tokens: int
    turns: list[Turn]
    transcript: list[TranscriptItem]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Session:
        return cls(
            id=body["id"], system_prompt=body.get("system_prompt"),
            parts=[SessionPart(**p) for p in body.get("parts") or []], metadata=dict(body.get("metadata") or {}),
            created_at=datetime.fromisoformat(body["created_at"]), max_context_tokens=body["max_context_tokens"],
            context_tokens=body["context_tokens"],
            turns=[Turn(index=t["index"], job_id=t["job_id"], task=t["task"], status=t["status"])
                   for t in body.get("turns") or []],
            transcript=[TranscriptItem.from_json(i) for i in body.get("transcript") or []], raw=body)


@dataclass(frozen=True)
class Share:
    """A link to a batch's gallery page (``POST /v1/batches/{id}/share``): the results, live
    progress and a zip download, for anyone holding ``url`` (no API key) until ``expires_at``."""

    url: str
    expires_at: datetime
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Share:
        return cls(url=body["url"], expires_at=datetime.fromisoformat(body["expires_at"]), raw=body)


@dataclass(frozen=True)
class Adapter:
    """A tenant's LoRA adapter (``POST /v1/adapters``), checked against the base model; jobs and
    batches name it by ``id``. ``size_bytes`` and ``sha256`` are those of its weights file;
    B·A is scaled by ``alpha / rank`` (and a job's ``adapter_scale``)."""

    id: str
    name: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created_at: datetime
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Adapter:
        return cls(id=body["id"], name=body["name"], rank=body["rank"], alpha=float(body["alpha"]),
                   target_modules=list(body.get("target_modules") or []), size_bytes=body["size_bytes"],
                   sha256=body["sha256"], created_at=datetime.fromisoformat(body["created_at"]), raw=body)


@dataclass(frozen=True)
class Provenance:
    """What made a finished job's output (``GET /v1/jobs/{id}/provenance``): the checkpoint's
    identity (``weights_sha256``), how it was loaded and where it ran, the versions, every
    parameter as run (``params``, seed included), the noise source and the output's SHA-256
    (None when the job failed). README "Provenance and re-run" says what each field means."""

    job_id: str
    status: str
    rerun_of: str | None
    recorded_at: datetime | None
    record_version: int
    weights_sha256: str
    model: str
    quantization: str
    offload: str
    dtype: str
    device: str
    device_name: str
    torch_threads: int
    engine_version: str
    python_version: str
    torch_version: str
    cuda_version: str | None
    cudnn_version: str | None
    bitsandbytes_version: str | None
    noise_source: str
    task: str
    params: dict[str, Any]
    seed: int | None
    think: bool
    think_text_sha256: str | None
    think_text: str | None
    taylorseer: bool
    adapter_id: str | None
    adapter_scale: float | None
    width: int | None
    height: int | None
    worker_id: str
    hostname: str
    output_sha256: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Provenance:
        return cls(
            job_id=body["job_id"], status=body["status"], rerun_of=body.get("rerun_of"),
            recorded_at=parse_datetime(body.get("recorded_at")), record_version=body.get("record_version", 1),
            weights_sha256=body["weights_sha256"], model=body.get("model", ""),
            quantization=body.get("quantization", "none"), offload=body.get("offload", "none"),
            dtype=body.get("dtype", ""), device=body.get("device", ""), device_name=body.get("device_name", ""),
            torch_threads=body.get("torch_threads", 0), engine_version=body.get("engine_version", ""),
            python_version=body.get("python_version", ""), torch_version=body.get("torch_version", ""),
            cuda_version=body.get("cuda_version"), cudnn_version=body.get("cudnn_version"),
            bitsandbytes_version=body.get("bitsandbytes_version"), noise_source=body.get("noise_source", ""),
            task=body["task"], params=dict(body.get("params") or {}), seed=body.get("seed"),
            think=bool(body.get("think")), think_text_sha256=body.get("think_text_sha256"),
            think_text=body.get("think_text"), taylorseer=bool(body.get("taylorseer")),
            adapter_id=body.get("adapter_id"), adapter_scale=body.get("adapter_scale"), width=body.get("width"),
            height=body.get("height"), worker_id=body.get("worker_id", ""), hostname=body.get("hostname", ""),
            output_sha256=body.get("output_sha256"), raw=body)


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try at sending a webhook: the receiver's status (None: no answer) and the error."""

    attempt: int
    at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None
    address: str | None


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery of the log (``/v1/webhooks/deliveries``); its ``id`` is the
    ``webhook-id`` header of every attempt. ``payload`` only on single reads, replays and tests."""

    id: str
    event: str
    url: str
    status: str
    job_id: str | None
    batch_id: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    replayed_at: datetime | None
    attempts: list[DeliveryAttempt]
    payload: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Delivery:
        attempts = [DeliveryAttempt(attempt=a["attempt"], at=datetime.fromisoformat(a["at"]),
                                    status_code=a.get("status_code"), latency_ms=a.get("latency_ms", 0.0),
                                    error=a.get("error"), address=a.get("address"))
                    for a in body.get("attempts") or []]
        return cls(
            id=body["id"], event=body["event"], url=body["url"], status=body["status"], job_id=body.get("job_id"),
            batch_id=body.get("batch_id"), created_at=datetime.fromisoformat(body["created_at"]),
            next_attempt_at=parse_datetime(body.get("next_attempt_at")),
            delivered_at=parse_datetime(body.get("delivered_at")), replayed_at=parse_datetime(body.get("replayed_at")),
            attempts=attempts, payload=body.get("payload"), raw=body)


@dataclass(frozen=True)
class Event:
    """A verified webhook: ``id`` (the ``webhook-id``: drop repeats by it), ``type`` (e.g.
    ``job.succeeded``, ``job.failed``, ``batch.completed``, ``webhook.test``), when it happened,
    and its ``data`` (a job's or a batch's fields, as README "Webhooks" lists; a job event's
    has ``dedupe``, ``dedupe_of`` and ``quality``: ``{gate, score, threshold, attempts}`` with
    ``attempts`` a count, or null)."""

    id: str
    type: str
    timestamp: datetime | None
    data: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)
