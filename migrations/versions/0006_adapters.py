"""LoRA adapters.

- adapters: a tenant's PEFT LoRA adapters (name unique per tenant), their two stored objects
  (``adapter_config.json`` and ``adapter_model.safetensors``), rank, alpha, target modules and size.
- jobs: ``adapter_id``, the adapter the job runs with (null: the base model); cleared if the
  adapter is deleted after the job finished (active jobs keep it from being deleted).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("config_key", sa.String(300), nullable=False),
        sa.Column("weights_key", sa.String(300), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_adapters_tenant_id_tenants"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_adapters_tenant_name")),
    )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("adapter_id", sa.String(36), nullable=True))
        batch_op.create_foreign_key(op.f("fk_jobs_adapter_id_adapters"), "adapters", ["adapter_id"], ["id"],
                                    ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint(op.f("fk_jobs_adapter_id_adapters"), type_="foreignkey")
        batch_op.drop_column("adapter_id")
    op.drop_table("adapters")
