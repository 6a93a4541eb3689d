"""The Celery application: one factory that turns ``Settings`` into a configured ``Celery``.

Owns: broker choice and the knobs long GPU tasks need (late acks, prefetch 1, no results,
visibility timeout above the longest chunk), the task routes (names in ``queues.py``), and the
embedded server-less broker. Leaves the task bodies to ``tasks.py`` and publishing to
``dispatch.py``.

Broker choice for the embedded default (measured on the 2-core dev machine, see the report in
``dispatch`` tests): kombu's SQLAlchemy transport on a WAL-mode SQLite file. It needs no
server, survives process restarts and is race-free; the filesystem transport writes the
message file before its content and crashes consumers. Stock kombu polls the SQL table once a
second and forwards transport options to ``create_engine``, so the poll interval is set on a
subclass instead of through ``broker_transport_options``.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqla

from worker import tasks
from worker.queues import DELIVER_WEBHOOKS, GPU_QUEUE, RUN_CHUNK, WEBHOOK_QUEUE

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_POLL_S = 0.02
SQLA_PREFIXES = ("sqla+", "sqlalchemy+")


class EmbeddedSqlTransport(kombu_sqla.Transport):
    """kombu's SQL transport polling every 20 ms instead of every second."""

    polling_interval = EMBEDDED_POLL_S


def is_embedded_broker(broker_url: str) -> bool:
    """True when the broker is a SQL table (no broker server to run)."""
    return broker_url.startswith(SQLA_PREFIXES)


def _prepare_sqlite_broker(url: str) -> None:
    """Create the broker file's folder and switch it to WAL once, so the API (publisher) and
    the workers (pollers) do not block each other."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return
    path = Path(url[len(prefix):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=30) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _visibility_timeout_s(settings: Settings) -> int:
    # A Redis message not acked within this window is delivered again. A chunk's lease bounds
    # how long a live worker may hold it, so the window is comfortably longer than that.
    return int(max(settings.lease_s * 2, 3600))


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for ``settings``: connects nothing until a message is sent or a
    worker starts. Tasks are registered here, so the app is complete for both sides."""
    broker_url = settings.broker_url
    conf: dict[str, object] = {}
    if is_embedded_broker(broker_url):
        sql_url = broker_url.split("+", 1)[1]
        _prepare_sqlite_broker(sql_url)
        broker_url = sql_url
        conf["broker_transport"] = f"{__name__}:EmbeddedSqlTransport"
        conf["broker_transport_options"] = {"connect_args": {"timeout": 30}} if sql_url.startswith("sqlite") else {}
    else:
        conf["broker_transport_options"] = {"visibility_timeout": _visibility_timeout_s(settings)}

    app = Celery("bagel_jobs", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=False,  # a killed worker's chunk comes back via the lease
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=GPU_QUEUE,
        task_routes={
            RUN_CHUNK: {"queue": GPU_QUEUE},
            DELIVER_WEBHOOKS: {"queue": WEBHOOK_QUEUE},
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=not is_embedded_broker(settings.broker_url),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        broker_pool_limit=4,
        **conf,
    )
    app.bagel_settings = settings
    tasks.register(app)
    return app
