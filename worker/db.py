"""Database connections and schema migrations.

Owns: building the SQLAlchemy engine for ``settings.database_url`` (PostgreSQL or SQLite),
the session factory, and running Alembic (configured in code — no alembic.ini). Leaves the
tables to ``worker.models`` and every state change to ``worker.jobs``.

SQLite is tuned for several processes sharing one file (API, GPU worker, webhook worker):
WAL journal, a 30 s busy timeout, foreign keys on, and ``BEGIN IMMEDIATE`` for every
transaction so two writers queue on the busy timeout instead of failing with "database is
locked" when a read transaction tries to upgrade to a write.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from worker.settings import Settings

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(settings: Settings | str, **kwargs: Any) -> Engine:
    """An engine for ``settings.database_url`` (or a URL string); creates a SQLite file's folder.
    A PostgreSQL engine built from settings keeps ``db_pool_size`` connections open and opens up to
    ``db_max_overflow`` more under load (per process: see ``connections_per_process``)."""
    url = settings if isinstance(settings, str) else settings.database_url
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
        _tune_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    if not isinstance(settings, str):
        kwargs.setdefault("pool_size", settings.db_pool_size)
        kwargs.setdefault("max_overflow", settings.db_max_overflow)
    return create_engine(url, **kwargs)


def connections_per_process(settings: Settings) -> int:
    """The most PostgreSQL connections one process's engine opens: the pool plus its overflow."""
    return settings.db_pool_size + settings.db_max_overflow


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (routes shape replies from them)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(settings: Settings | str) -> Config:
    """An Alembic ``Config`` pointing at ``migrations/`` and the settings' database."""
    url = settings if isinstance(settings, str) else settings.database_url
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    cfg.attributes["database_url"] = url
    return cfg


def upgrade(settings: Settings | str, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (creates a SQLite file's folder first)."""
    url = settings if isinstance(settings, str) else settings.database_url
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
    log.info("database upgraded to %s", revision)


def downgrade(settings: Settings | str, revision: str) -> None:
    """Take the schema down to ``revision`` ("base" drops every table)."""
    command.downgrade(alembic_config(settings), revision)
    log.info("database downgraded to %s", revision)
