"""Sessions: turns that see the earlier turns.

- sessions: a tenant's conversation with the model — an optional system prompt and opening parts
  (texts and input files), its metadata. Its turns are jobs.
- jobs: ``session_id`` and ``turn_index`` for a session's turn (deleted with the session);
  ``after_job_id``, the earlier turn a turn waits for (cleared when that one succeeds: turns run
  in order).
- chunks: ``preferred_worker``, the GPU worker holding the session's context cache when the
  chunk was formed (an optimisation: any worker may take it after ``session_affinity_s``).
- workers: ``sessions``, the sessions whose context a worker holds in its cache.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(36), sa.ForeignKey("tenants.id", ondelete="CASCADE",
                                                             name=op.f("fk_sessions_tenant_id_tenants")),
                  nullable=False),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("parts", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sessions_tenant_id_created_at", "sessions", ["tenant_id", "created_at"])
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("session_id", sa.String(36), nullable=True))
        batch_op.add_column(sa.Column("turn_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("after_job_id", sa.String(36), nullable=True))
        batch_op.create_foreign_key(op.f("fk_jobs_session_id_sessions"), "sessions", ["session_id"], ["id"],
                                    ondelete="CASCADE")
        batch_op.create_foreign_key(op.f("fk_jobs_after_job_id_jobs"), "jobs", ["after_job_id"], ["id"],
                                    ondelete="SET NULL")
        batch_op.create_index("ix_jobs_session_id_turn_index", ["session_id", "turn_index"], unique=True)
        batch_op.create_index("ix_jobs_after_job_id", ["after_job_id"])
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("preferred_worker", sa.String(200), nullable=True))
    with op.batch_alter_table("workers") as batch_op:
        batch_op.add_column(sa.Column("sessions", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("sessions")
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.drop_column("preferred_worker")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_after_job_id")
        batch_op.drop_index("ix_jobs_session_id_turn_index")
        batch_op.drop_constraint(op.f("fk_jobs_after_job_id_jobs"), type_="foreignkey")
        batch_op.drop_constraint(op.f("fk_jobs_session_id_sessions"), type_="foreignkey")
        batch_op.drop_column("after_job_id")
        batch_op.drop_column("turn_index")
        batch_op.drop_column("session_id")
    op.drop_index("ix_sessions_tenant_id_created_at", table_name="sessions")
    op.drop_table("sessions")
