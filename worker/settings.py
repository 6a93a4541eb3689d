"""Deployment settings of the job service: one ``Settings`` object read from the environment.

Owns: every knob of the service (database, broker, storage, model, GPU memory budget, limits,
leases, retries, webhooks, reconciler, test-only fault injection), its start-up validation and
the masked dump printed by ``bagel-jobs config``. Leaves architecture config to the checkpoint (``bagel.config``) and
per-request knobs to ``worker.params``.

Built once per entry point (API factory, worker start-up, CLI) and passed down; importing this
module reads nothing. Every variable is ``BAGEL_JOBS_<FIELD>`` (also read from ``.env``).
The defaults are the embedded stack: a SQLite file, a local storage folder, a server-less
SQLite broker and a tiny demo checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import SettingsError
from worker.faults import parse_fault
from worker.webhook_targets import parse_dns_server

ENV_PREFIX = "BAGEL_JOBS_"
MIB = 1024 * 1024
GIB = 1024 * MIB
TINY_MODEL_DIR = Path("var/models/tiny-demo")


class Settings(BaseSettings):
    """All deployment settings; field docs double as the reference for the env variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore",
        validate_default=True,
    )

    # State and transport.
    database_url: str = Field("sqlite:///var/bagel-jobs.db",
                              description="SQLAlchemy URL: postgresql+psycopg://… or sqlite:///path")
    broker_url: str = Field("sqla+sqlite:///var/broker.db",
                            description="Celery broker: redis://… or the server-less sqla+sqlite:///…")

    # Object storage.
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Path("var/storage")
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    presign_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    public_base_url: str = Field("", description="base of local-storage download URLs; empty → the API's "
                                 "own address, http://API_HOST:API_PORT (127.0.0.1 for a wildcard host)")
    url_signing_key: SecretStr | None = Field(
        None, description="HMAC key for local-storage download URLs; None → a key file in storage_dir")

    # Model.
    model_path: Path | None = Field(None, description="checkpoint folder; None → tiny demo checkpoint")
    quantization: Literal["none", "nf4", "int8"] = "none"
    device: str = "auto"
    offload: Literal["none", "layers"] = Field(
        "none", description="layers: keep the decoder layers in (pinned) host memory and stream them to the "
        "GPU as they run — slower, for 8–12 GB GPUs with the RAM to spare (bagel/offload.py)")

    # GPU memory. The engine splits a batch whose working-memory estimate (``bagel/memory.py``,
    # weights excluded) exceeds the budget into sub-batches, and fails a job that cannot fit alone
    # with ``gpu_out_of_memory``. Unset on CUDA: the free device memory after loading the model
    # minus the margin; unset on CPU: no budget. The 2 GiB margin is for what the estimate leaves
    # out: the caching allocator's fragmentation, cuBLAS and attention-kernel workspaces, and the
    # estimate's own error. A fixed amount rather than a fraction: those costs do not grow with
    # the card (2 GiB is under 3 % of an 80 GB card and still leaves most of a 24 GB one).
    gpu_memory_budget_bytes: int | None = Field(
        None, gt=0, description="working memory one engine run may use; None → free memory − margin on CUDA")
    gpu_memory_margin_bytes: int = Field(
        2 * GIB, ge=0, description="kept free on CUDA when the budget comes from the free memory")
    # Tests only (worker/faults.py): "oom_above_rows:N" or "device_error" (GPU workers), or
    # "pause_after_object_write:S" (the API, between an upload's object write and its commit).
    fault_injection: str | None = Field(None, description="inject a fault on purpose (tests only): a GPU "
                                        "fault into the LLM forwards, or a pause in the upload handler")

    # Limits.
    chunk_size: int = Field(8, ge=1, le=256)
    max_batch_items: int = Field(256, ge=1, le=100_000)
    max_upload_bytes: int = Field(20 * MIB, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_image_side_px: int = Field(8192, ge=16)
    max_output_side_px: int = Field(1024, ge=16)
    max_adapter_bytes: int = Field(512 * MIB, ge=1024, description="largest adapter_model.safetensors an "
                                   "upload may carry (POST /v1/adapters)")
    adapter_cache_bytes: int = Field(2 * GIB, ge=0, description="device memory a GPU worker keeps loaded "
                                     "adapters in (least recently used evicted first)")
    session_max_context_tokens: int = Field(16384, ge=256, description="the most tokens a session's context "
                                            "may reach, its turn's output included (a turn beyond it is a 422)")
    session_cache_bytes: int = Field(2 * GIB, ge=0, description="device memory a GPU worker keeps sessions' "
                                     "context caches in (least recently used evicted first)")
    session_affinity_s: float = Field(3.0, ge=0, description="how long a session turn waits for the worker "
                                      "that holds its context cache before any worker takes it")

    # Execution.
    lease_s: int = Field(600, ge=1)
    max_attempts: int = Field(3, ge=1, le=100)
    retry_backoff_s: float = Field(5.0, ge=0)
    progress_every_steps: int = Field(5, ge=1)
    outage_budget_s: float = Field(3600.0, gt=0, description="how long a job may wait on an unavailable "
                                   "dependency (storage, database, broker) before it fails with dependency_outage")
    outage_backoff_max_s: float = Field(60.0, gt=0, description="cap of the backoff (with jitter) between "
                                        "a job's tries while a dependency is down; no attempt is counted")

    # Webhooks.
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_retry_window_s: int = Field(86_400, ge=0)
    webhook_allow_private: bool = Field(False, description="deliver to private, loopback and link-local "
                                        "addresses too (development; off in production)")
    webhook_dns_server: str | None = Field(None, description="IP, IP:PORT or [IPv6]:PORT of the DNS server "
                                           "deliveries resolve callback hosts with; None → the system resolver")
    batch_progress_interval_s: float = Field(30.0, gt=0, le=86_400, description="at most one batch.progress "
                                             "webhook per batch per this many seconds (fixed per batch when it is "
                                             "submitted)")

    # Reconciler.
    reconcile_interval_s: float = Field(30.0, gt=0)
    result_retention_s: int = Field(7 * 24 * 3600, ge=1)
    orphan_sweep_interval_s: float = Field(3600.0, gt=0, description="how often the reconciler removes "
                                           "uploaded objects that no file row refers to")
    orphan_grace_s: float = Field(3600.0, ge=0, description="an object younger than this may still be "
                                  "committing and is never swept")

    # Dispatcher (runs in the reconciler process; one at a time cluster-wide, by a lease row).
    dispatch_interval_s: float = Field(0.25, gt=0, description="seconds between dispatch passes")
    dispatch_lease_s: float = Field(15.0, gt=0, description="the dispatcher lease; another takes over after it")
    window_per_worker: int = Field(2, ge=1, le=16, description="chunks published per live GPU worker "
                                   "(running + waiting in the broker)")
    fair_share_window_s: int = Field(3600, ge=60, description="recent GPU-seconds that count for fair share")
    worker_heartbeat_s: float = Field(5.0, gt=0, description="GPU workers refresh their registry row this often")
    worker_dead_after_s: float = Field(30.0, gt=0, description="a worker silent this long is not counted live")
    lost_message_after_s: float = Field(10.0, gt=0, description="a published chunk missing from the broker "
                                        "this long is published again")

    # GPU worker process.
    drain: Literal["finish", "release"] = Field(
        "finish", description="on SIGTERM: finish the current chunk then exit (finish), or stop at the next "
        "step and give its jobs back (release)")
    worker_http_port: int | None = Field(None, ge=1, le=65535, description="GPU worker's /metrics, /livez, "
                                         "/readyz port; None → not served")

    # Logs.
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line with "
                                                "job, batch, chunk and tenant ids")

    # API process.
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_workers: int | None = Field(None, ge=1, le=64, description="API worker processes; None → one per "
                                    "CPU core, at most 8. Each may open DB_POOL_SIZE + DB_MAX_OVERFLOW "
                                    "connections: keep the total, with the other processes' pools, under "
                                    "PostgreSQL's max_connections")
    db_pool_size: int = Field(5, ge=1, le=100, description="database connections kept open per process; an "
                              "API process also runs its routes on this many threads")
    db_max_overflow: int = Field(5, ge=0, le=100, description="extra connections a process may open "
                                 "under load (closed when returned)")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty or blank string for an optional (``X | None``) setting means unset.

        A ConfigMap or compose file writes ``VAR: ""`` to leave a setting at its default; passed
        on as ``""``, an empty ``S3_ENDPOINT_URL`` would reach boto3 (``ValueError: Invalid
        endpoint``) instead of meaning AWS. Required and non-optional fields keep their ``""``.
        """
        is_blank = isinstance(value, str) and not value.strip()
        if is_blank and _allows_none(cls.model_fields[info.field_name].annotation):
            return None
        return value

    @field_validator("fault_injection")
    @classmethod
    def _check_fault(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_fault(value)  # a ValueError says what is wrong and lists the accepted forms
        return value.strip()

    @field_validator("webhook_dns_server")
    @classmethod
    def _check_dns_server(cls, value: str | None) -> str | None:
        if value is not None:
            parse_dns_server(value)  # a ValueError says what is accepted
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        scheme = urlsplit(self.database_url).scheme
        if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
            raise ValueError(f"{ENV_PREFIX}DATABASE_URL: scheme {scheme!r} is not supported "
                             "(use postgresql+psycopg://… or sqlite:///…)")
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError(f"{ENV_PREFIX}S3_BUCKET: required when {ENV_PREFIX}STORAGE_BACKEND=s3")
        if not self.public_base_url.strip():
            self.public_base_url = api_base_url(self.api_host, self.api_port)
        if urlsplit(self.public_base_url).scheme not in ("http", "https"):
            raise ValueError(f"{ENV_PREFIX}PUBLIC_BASE_URL: {self.public_base_url!r} is not an "
                             "http(s) URL")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def masked_dump(self) -> dict[str, Any]:
        """Every setting as JSON-able values, secrets and URL passwords replaced by ``***``."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                out[name] = "***" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                out[name] = str(value)
            elif name.endswith("_url") and isinstance(value, str):
                out[name] = mask_url(value)
            else:
                out[name] = value
        return out


def api_base_url(host: str, port: int) -> str:
    """``http://host:port`` of an API bound to ``host``, as a client on this machine reaches it: a
    wildcard address (``0.0.0.0``, ``::``) as ``127.0.0.1``, an IPv6 address in brackets."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _allows_none(annotation: Any) -> bool:
    """Whether a field's annotation admits None (``X | None``, ``Optional[X]``)."""
    return annotation is None or type(None) in get_args(annotation)


def mask_url(url: str) -> str:
    """``scheme://user:secret@host/…`` → ``scheme://user:***@host/…``; other URLs unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def load_settings(**overrides: Any) -> Settings:
    """Build the settings for an entry point; a bad value raises ``SettingsError`` with a
    sentence naming the variable, the value and what is allowed."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p != "__root__"]
            message = err["msg"].removeprefix("Value error, ")
            if loc:
                var = ENV_PREFIX + loc[0].upper()
                shown = "***" if ("secret" in loc[0] or "key" in loc[0]) else repr(err.get("input"))
                problems.append(f"{var}={shown}: {message}")
            else:
                problems.append(message)
        raise SettingsError("; ".join(problems)) from exc
