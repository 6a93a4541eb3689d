"""Provenance and re-runs.

- jobs: ``provenance``, the reproducibility record a GPU worker stores when it finishes the job
  (weights identity, load options, versions, every parameter as run, the output's hash); null
  until then.
- jobs: ``rerun_of``, the job this one re-runs (``POST /v1/jobs/{id}/rerun``); null for a job
  submitted on its own, and cleared if that job is deleted.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("provenance", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("rerun_of", sa.String(36), nullable=True))
        batch_op.create_foreign_key(op.f("fk_jobs_rerun_of_jobs"), "jobs", ["rerun_of"], ["id"],
                                    ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint(op.f("fk_jobs_rerun_of_jobs"), type_="foreignkey")
        batch_op.drop_column("rerun_of")
        batch_op.drop_column("provenance")
