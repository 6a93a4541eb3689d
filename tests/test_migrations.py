"""Alembic migrations on real PostgreSQL and SQLite: up, down, up again, and the models agree
with the migrated schema (autogenerate finds nothing to add)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from worker import db
from worker.models import Base

TABLES = {"tenants", "api_keys", "files", "batches", "chunks", "jobs", "webhook_deliveries",
          "webhook_attempts", "idempotency_records", "workers", "leases", "job_costs", "adapters", "sessions"}


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, make_empty_database: Callable[[str], str]) -> str:
    return make_empty_database(request.param)


def tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip(empty_url):
    assert tables(empty_url) == set()
    db.upgrade(empty_url)
    assert tables(empty_url) == TABLES
    db.downgrade(empty_url, "base")
    assert tables(empty_url) == set()
    db.upgrade(empty_url)
    assert tables(empty_url) == TABLES


def test_models_and_migrations_agree(empty_url):
    db.upgrade(empty_url)
    engine = db.make_engine(empty_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                             "compare_server_default": True})
            diff = compare_metadata(context, Base.metadata)
            assert context.get_current_revision() == ScriptDirectory.from_config(
                db.alembic_config(empty_url)).get_current_head()
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_migrations_form_one_linear_history():
    script = ScriptDirectory.from_config(db.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert revisions[-1].down_revision is None
