"""Alembic environment: runs migrations online against the URL ``worker.db.alembic_config`` put
in the config's attributes (or, when Alembic is run by hand, the settings from the environment).

Owns: the connection used by a migration run and the comparison options (types compared,
batch mode on SQLite so ALTERs work there). Leaves the table definitions to ``worker.models``.
"""

from __future__ import annotations

from alembic import context

from worker.db import make_engine
from worker.models import Base
from worker.settings import load_settings

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    url = config.attributes.get("database_url")
    return url if url else load_settings().database_url


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
