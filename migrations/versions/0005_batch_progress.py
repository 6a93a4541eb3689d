"""Batch progress reports.

- batches: ``progress_interval_s`` (at most one ``batch.progress`` event per this many seconds,
  fixed at submission; null: none), ``report_seq`` (the number of the last report: each
  ``batch.progress`` and, last, ``batch.completed`` takes the next) and ``reported_at`` (when the
  last ``batch.progress`` was written: the throttle).
- jobs: ``report_seq`` (the report that first counted the job final: the manifest's ``since``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("progress_interval_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("report_seq", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("report_seq", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("report_seq")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("reported_at")
        batch_op.drop_column("report_seq")
        batch_op.drop_column("progress_interval_s")
