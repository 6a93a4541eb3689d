"""Database tables of the job service (SQLAlchemy 2 declarative, sync).

Owns: the schema — tenants and their API keys, uploaded files, batches, chunks, jobs, webhook
deliveries and their attempts, idempotency records — and the status enums. Leaves every state
change to ``worker.jobs`` (jobs, batches, chunks, deliveries) and ``worker.tenants`` (tenants,
keys); the schema itself changes only through ``migrations/``.

Portable between PostgreSQL and SQLite: ids are 36-char uuid strings, enums are stored by value
in VARCHAR columns with a CHECK constraint, and timestamps go through ``UTCDateTime`` so both
databases hand back timezone-aware UTC datetimes.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names so migrations can refer to them on both databases.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite stores naive UTC wall time)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the service only stores UTC-aware times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    expired = "expired"  # its deadline passed before a GPU started it, or while it ran

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled, JobStatus.expired})
ACTIVE_STATUSES = frozenset({JobStatus.queued, JobStatus.running})
# The rows of ``ux_jobs_dedupe_leader``: a job that runs itself for its request hash, not done yet.
DEDUPE_LEADER_WHERE = "request_hash IS NOT NULL AND dedupe_of IS NULL AND status IN ('queued', 'running')"


class DeliveryStatus(enum.StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class Priority(enum.StrEnum):
    interactive = "interactive"  # dispatched ahead of the tenant's batch work
    batch = "batch"


class WorkerState(enum.StrEnum):
    loading = "loading"
    ready = "ready"
    draining = "draining"  # finishing its chunk, taking no new one
    blocked = "blocked"  # its storage is unreachable: takes no chunk until it is back


TASK_NAMES = ("generate", "edit", "understand", "tryon")


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda e: [m.value for m in e], validate_strings=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    webhook_secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Scheduling and limits (``bagel-jobs tenant limits``); None: unlimited.
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_waiting_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_running_chunks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    monthly_gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Exact-request dedupe (``worker.dedupe``): on unless the tenant opted out.
    dedupe: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # The quality gate's questions per task (``worker.quality``); None: the built-in set.
    gate_questions: Mapped[dict[str, list[str]] | None] = mapped_column(JSON, nullable=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, shown in listings
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("tenant_id", "sha256", name="uq_files_tenant_sha256"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    content_type: Mapped[str] = mapped_column(String(50))
    format: Mapped[str] = mapped_column(String(10))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Adapter(Base):
    """A tenant's PEFT LoRA adapter: two stored objects and what the upload check read from them."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_adapters_tenant_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64))  # of the weights file
    config_key: Mapped[str] = mapped_column(String(300))
    weights_key: Mapped[str] = mapped_column(String(300))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_count: Mapped[int] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"), default=Priority.batch,
                                                server_default=Priority.batch.value)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Reports while it runs (``worker.progress``): at most one ``batch.progress`` per
    # ``progress_interval_s`` (None: none), numbered by ``report_seq`` (batch.completed takes the last).
    progress_interval_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    report_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # the last batch.progress


class ModelSession(Base):
    """A tenant's session with the model (``worker.sessions``): an optional system prompt
    and opening parts; its turns are jobs (``Job.session_id``), deleted with it."""

    __tablename__ = "sessions"
    __table_args__ = (Index("ix_sessions_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    system_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The opening parts, in order: {"text": …} or {"file_id": …}.
    parts: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Chunk(Base):
    """The unit of GPU work, formed by the dispatcher from compatible waiting jobs (any batch,
    any tenant) and published as one message; finished when its worker is done with it."""

    __tablename__ = "chunks"
    __table_args__ = (Index("ix_chunks_finished_at_claimed_at", "finished_at", "claimed_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    job_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_key: Mapped[str] = mapped_column(String(120), default="")
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Its place in the claim order, fixed when formed: the head job's priority, then the head
    # tenant's fair-share key (recent GPU-seconds per weight); a worker's turn claims the first.
    share: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    priority_rank: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # A session turn's chunk: the worker that held the session's context when it was formed.
    preferred_worker: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_lease_until", "status", "lease_until"),
        Index("ix_jobs_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_jobs_status_chunk_id_queued_at", "status", "chunk_id", "queued_at"),
        Index("ix_jobs_tenant_id_request_hash", "tenant_id", "request_hash"),
        Index("ix_jobs_session_id_turn_index", "session_id", "turn_index", unique=True),
        # One job per tenant and request hash runs itself while waiting or running; its twins
        # wait for it (``worker.dedupe``).
        Index("ux_jobs_dedupe_leader", "tenant_id", "request_hash", unique=True,
              postgresql_where=text(DEDUPE_LEADER_WHERE), sqlite_where=text(DEDUPE_LEADER_WHERE)),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"),
                                                 nullable=True, index=True)
    # None while waiting for the dispatcher; set when a chunk takes the job, cleared when the job
    # goes back to waiting (a retry, an expired lease, a release).
    chunk_id: Mapped[str | None] = mapped_column(ForeignKey("chunks.id", ondelete="SET NULL"),
                                                 nullable=True, index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"), nullable=True)
    # The job this one re-runs (POST /v1/jobs/{id}/rerun); cleared if that job is deleted.
    rerun_of: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    # A session's turn (``worker.sessions``): its session and place; the earlier turn it waits
    # for (cleared when that one succeeds).
    session_id: Mapped[str | None] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), nullable=True)
    turn_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    after_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True,
                                                     index=True)
    # Exact-request dedupe (``worker.dedupe``): the hash of what decides its output (None: it
    # cannot be answered from another job), and the job whose result answers it.
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dedupe_of: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True,
                                                  index=True)
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"), default=Priority.batch,
                                                server_default=Priority.batch.value)
    chunk_key: Mapped[str] = mapped_column(String(64), default="")  # jobs with equal keys share a chunk
    cost_key: Mapped[str] = mapped_column(String(120), default="")  # task/size/steps/think: the ETA model
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # a retry's backoff
    outage_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # outage budget start
    deferrals: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # waits on a dependency
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    task: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)
    input_file_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    think: Mapped[bool] = mapped_column(Boolean, default=False)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)

    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.queued)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    model_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # its share of its chunks' GPU time
    phase_seconds: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)

    output_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    output_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    think_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # What made the output (``worker.provenance``), written by the GPU worker that finished it.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The quality gate's record (``worker.quality``): every attempt and the verdict.
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The batch report (``Batch.report_seq``) that first counted it final; None until one did.
    report_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)

    @property
    def dedupe_state(self) -> str | None:
        """``hit``: answered from an identical job's result (``dedupe_of``); ``waiting``: waits on
        an identical job; ``miss``: it qualified and ran (or runs) itself; None: it did not
        qualify (no seed given, the tenant opted out, a re-run)."""
        if self.dedupe_of is not None and JobStatus(self.status) == JobStatus.succeeded:
            return "hit"
        if self.dedupe_of is not None and JobStatus(self.status) == JobStatus.queued:
            return "waiting"
        return "miss" if self.request_hash is not None else None

    @property
    def dedupe_source(self) -> str | None:
        """The job that answers it (hit) or that it waits on (waiting); None otherwise — a job
        that ended while waiting (canceled, expired) has neither."""
        return self.dedupe_of if self.dedupe_state in ("hit", "waiting") else None


class WebhookDelivery(Base):
    """One event for one URL (or a test ping): its id is the ``webhook-id`` every attempt and
    replay of it carries, so a receiver can drop repeats."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
                      Index("ix_webhook_deliveries_tenant_id_created_at", "tenant_id", "created_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "msg_<uuid hex>", the webhook-id
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                               nullable=True, index=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"),
                                                 nullable=True, index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus, "delivery_status"),
                                                   default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The last replay asked for: the retry window counts from here instead of ``created_at``.
    replayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
                                             index=True)
    attempt_no: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The checked address the attempt connected to; None when it got no further than DNS or the policy.
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)


class IdempotencyRecord(Base):
    """The first response to a creating POST, replayed for the same key and body."""

    __tablename__ = "idempotency_records"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    route: Mapped[str] = mapped_column(String(100))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Worker(Base):
    """A live GPU worker process: registered at start, heartbeat every few seconds. The
    dispatcher sizes its window from the ready ones; metrics and ETAs count them."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[WorkerState] = mapped_column(_enum(WorkerState, "worker_state"), default=WorkerState.loading)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    current_chunk_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # The loaded model's identity (``bagel.identity``), set once it is loaded.
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    quantization: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The sessions whose context it holds in its cache (``worker.sessions``), newest last.
    sessions: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class Lease(Base):
    """A named cluster-wide lease (the dispatcher's): one owner at a time until ``until``."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    until: Mapped[datetime] = mapped_column(UTCDateTime())


class JobCost(Base):
    """Measured GPU-seconds per job of one kind (``Job.cost_key``): an exponential moving
    average, the ETA's and the backlog metric's unit price."""

    __tablename__ = "job_costs"

    cost_key: Mapped[str] = mapped_column(String(120), primary_key=True)
    avg_gpu_seconds: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def result_keys(output_key: str | None, quality: dict[str, Any] | None) -> set[str]:
    """The stored objects of a job's result: its output and, with the quality gate, every
    attempt's image (``worker.quality``)."""
    keys = {output_key} if output_key is not None else set()
    for attempt in (quality or {}).get("attempts", []):
        if attempt.get("output_key"):
            keys.add(attempt["output_key"])
    return keys
