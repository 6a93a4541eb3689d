"""Outages: a job waiting on an unavailable dependency, and a worker that cannot reach storage.

- jobs: ``outage_since`` (when the job first had to wait on a dependency — the start of its
  outage budget) and ``deferrals`` (how many times it waited, the backoff's exponent).
- workers: state gains ``blocked`` (its storage is unreachable: it takes no chunk).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WORKER_STATES_0002 = ("loading", "ready", "draining")
WORKER_STATES = (*WORKER_STATES_0002, "blocked")


def _state_check(values: Sequence[str]) -> str:
    return "state IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("outage_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("deferrals", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_constraint(op.f("ck_workers_worker_state"), type_="check")
        batch_op.create_check_constraint("worker_state", _state_check(WORKER_STATES))


def downgrade() -> None:
    op.execute("UPDATE workers SET state = 'ready' WHERE state = 'blocked'")
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_constraint(op.f("ck_workers_worker_state"), type_="check")
        batch_op.create_check_constraint("worker_state", _state_check(WORKER_STATES_0002))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("deferrals")
        batch_op.drop_column("outage_since")
