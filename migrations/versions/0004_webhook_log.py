"""Webhook delivery log and replay.

- webhook_deliveries: ``replayed_at`` (the last replay: the retry window counts from it) and an
  index on (tenant_id, created_at) for the tenant's delivery log, newest first.
- webhook_attempts: ``address`` (the checked address the attempt connected to).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch_op:
        batch_op.add_column(sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_webhook_deliveries_tenant_id_created_at", ["tenant_id", "created_at"],
                              unique=False)
    with op.batch_alter_table("webhook_attempts") as batch_op:
        batch_op.add_column(sa.Column("address", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_attempts") as batch_op:
        batch_op.drop_column("address")
    with op.batch_alter_table("webhook_deliveries") as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_tenant_id_created_at")
        batch_op.drop_column("replayed_at")
