"""Exact-request dedupe and the quality gate.

- jobs: ``request_hash``, the hash of everything that decides a deterministic job's output
  (``worker.dedupe``); null for a job that cannot be answered from another (no seed given, the
  tenant opted out, a re-run). ``dedupe_of``: the job whose result answers this one (a finished
  original, or a twin still running); null for a job that runs itself. A partial unique index
  lets only one waiting or running job per tenant and hash run itself: the twins of concurrent
  submissions wait for it.
- jobs: ``quality``, the quality gate's record (every attempt's seed, score, answers and image
  key; the verdict); null for a job without the gate.
- tenants: ``dedupe`` (on unless the tenant opted out) and ``gate_questions`` (the tenant's own
  question set; null: the built-in one).
- workers: ``weights_sha256`` and ``quantization``, the loaded model's identity, so a finished
  job is reused only while the fleet still runs the same weights.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As ``worker.models.DEDUPE_LEADER_WHERE`` (a migration keeps its own copy).
LEADER_WHERE = "request_hash IS NOT NULL AND dedupe_of IS NULL AND status IN ('queued', 'running')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("request_hash", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("dedupe_of", sa.String(36), nullable=True))
        batch_op.add_column(sa.Column("quality", sa.JSON(), nullable=True))
        batch_op.create_foreign_key(op.f("fk_jobs_dedupe_of_jobs"), "jobs", ["dedupe_of"], ["id"],
                                    ondelete="SET NULL")
        batch_op.create_index("ix_jobs_tenant_id_request_hash", ["tenant_id", "request_hash"])
        batch_op.create_index("ix_jobs_dedupe_of", ["dedupe_of"])
    op.create_index("ux_jobs_dedupe_leader", "jobs", ["tenant_id", "request_hash"], unique=True,
                    postgresql_where=sa.text(LEADER_WHERE), sqlite_where=sa.text(LEADER_WHERE))
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("dedupe", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("gate_questions", sa.JSON(), nullable=True))
    with op.batch_alter_table("workers") as batch_op:
        batch_op.add_column(sa.Column("weights_sha256", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("quantization", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("quantization")
        batch_op.drop_column("weights_sha256")
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("gate_questions")
        batch_op.drop_column("dedupe")
    op.drop_index("ux_jobs_dedupe_leader", table_name="jobs")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_dedupe_of")
        batch_op.drop_index("ix_jobs_tenant_id_request_hash")
        batch_op.drop_constraint(op.f("fk_jobs_dedupe_of_jobs"), type_="foreignkey")
        batch_op.drop_column("quality")
        batch_op.drop_column("dedupe_of")
        batch_op.drop_column("request_hash")
