"""The database schedules: chunks formed at dispatch, priorities, deadlines, tenant limits and
weights, GPU-seconds accounting, worker registry, the dispatcher's lease and the cost model.

- jobs: ``chunk_id`` nullable (set by the dispatcher; ON DELETE SET NULL), ``priority``,
  ``chunk_key``/``cost_key``, ``not_before`` (a retry's backoff), ``deadline_at``,
  ``gpu_seconds``, ``phase_seconds``; status gains ``expired``.
- chunks: no longer one tenant's or one batch's; ``job_count``, ``cost_key``, claim and finish
  times, the claiming worker, the chunk's GPU-seconds and its place in the dispatch order
  (``share``, ``priority_rank``).
- batches: ``priority``, ``deadline_at``. tenants: ``weight`` and the four limits.
- new tables: ``workers``, ``leases``, ``job_costs``.

Downgrading refuses while jobs wait without a chunk (0001 requires one per job).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)
JOB_STATUSES_0001 = ("queued", "running", "succeeded", "failed", "canceled")
JOB_STATUSES = (*JOB_STATUSES_0001, "expired")


def _priority() -> sa.Enum:
    return sa.Enum("interactive", "batch", name="priority", native_enum=False, create_constraint=True, length=16)


def _status_check(values: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    op.create_table(
        "job_costs",
        sa.Column("cost_key", sa.String(length=120), nullable=False),
        sa.Column("avg_gpu_seconds", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("cost_key", name=op.f("pk_job_costs")),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("until", TZ, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("state", sa.Enum("loading", "ready", "draining", name="worker_state", native_enum=False,
                                   create_constraint=True, length=16), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("last_seen", TZ, nullable=False),
        sa.Column("current_chunk_id", sa.String(length=36), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="1.0"))
        batch_op.add_column(sa.Column("requests_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_waiting_jobs", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_running_chunks", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("monthly_gpu_seconds", sa.Float(), nullable=True))
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("priority", _priority(), nullable=False, server_default="batch"))
        batch_op.add_column(sa.Column("deadline_at", TZ, nullable=True))
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("job_count", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("cost_key", sa.String(length=120), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("claimed_at", TZ, nullable=True))
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("finished_at", TZ, nullable=True))
        batch_op.add_column(sa.Column("gpu_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("share", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("priority_rank", sa.Integer(), nullable=False, server_default="1"))
        batch_op.drop_index(op.f("ix_chunks_batch_id"))
        batch_op.drop_constraint(op.f("fk_chunks_tenant_id_tenants"), type_="foreignkey")
        batch_op.drop_constraint(op.f("fk_chunks_batch_id_batches"), type_="foreignkey")
        batch_op.drop_column("batch_id")
        batch_op.drop_column("tenant_id")
        batch_op.create_index("ix_chunks_finished_at_claimed_at", ["finished_at", "claimed_at"], unique=False)
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("priority", _priority(), nullable=False, server_default="batch"))
        batch_op.add_column(sa.Column("chunk_key", sa.String(length=64), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("cost_key", sa.String(length=120), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("not_before", TZ, nullable=True))
        batch_op.add_column(sa.Column("deadline_at", TZ, nullable=True))
        batch_op.add_column(sa.Column("gpu_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("phase_seconds", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.alter_column("chunk_id", existing_type=sa.String(length=36), nullable=True)
        batch_op.drop_constraint(op.f("fk_jobs_chunk_id_chunks"), type_="foreignkey")
        batch_op.create_foreign_key(op.f("fk_jobs_chunk_id_chunks"), "chunks", ["chunk_id"], ["id"],
                                    ondelete="SET NULL")
        batch_op.drop_constraint(op.f("ck_jobs_job_status"), type_="check")
        batch_op.create_check_constraint("job_status", _status_check(JOB_STATUSES))
        batch_op.create_index("ix_jobs_status_chunk_id_queued_at", ["status", "chunk_id", "queued_at"], unique=False)
    # the defaults of the keys and phases only filled existing rows; new rows always carry them
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.alter_column("chunk_key", existing_type=sa.String(length=64), server_default=None)
        batch_op.alter_column("cost_key", existing_type=sa.String(length=120), server_default=None)
        batch_op.alter_column("phase_seconds", existing_type=sa.JSON(), server_default=None)
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.alter_column("cost_key", existing_type=sa.String(length=120), server_default=None)


def downgrade() -> None:
    bind = op.get_bind()
    waiting = bind.execute(sa.text("SELECT count(*) FROM jobs WHERE chunk_id IS NULL OR status = 'expired'")).scalar()
    if waiting:
        raise RuntimeError(f"cannot downgrade below 0002: {waiting} job(s) wait without a chunk or are expired, "
                           "which revision 0001 cannot hold; let them finish first")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_status_chunk_id_queued_at")
        batch_op.drop_constraint(op.f("ck_jobs_job_status"), type_="check")
        batch_op.create_check_constraint("job_status", _status_check(JOB_STATUSES_0001))
        batch_op.drop_constraint(op.f("fk_jobs_chunk_id_chunks"), type_="foreignkey")
        batch_op.create_foreign_key(op.f("fk_jobs_chunk_id_chunks"), "chunks", ["chunk_id"], ["id"],
                                    ondelete="CASCADE")
        batch_op.alter_column("chunk_id", existing_type=sa.String(length=36), nullable=False)
        batch_op.drop_constraint(op.f("ck_jobs_priority"), type_="check")
        for column in ("phase_seconds", "gpu_seconds", "deadline_at", "not_before", "cost_key", "chunk_key",
                       "priority"):
            batch_op.drop_column(column)
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("batch_id", sa.String(length=36), nullable=True))
    op.execute("UPDATE chunks SET tenant_id = (SELECT jobs.tenant_id FROM jobs WHERE jobs.chunk_id = chunks.id "
               "LIMIT 1), batch_id = (SELECT jobs.batch_id FROM jobs WHERE jobs.chunk_id = chunks.id LIMIT 1)")
    op.execute("DELETE FROM chunks WHERE tenant_id IS NULL")
    with op.batch_alter_table("chunks") as batch_op:
        batch_op.alter_column("tenant_id", existing_type=sa.String(length=36), nullable=False)
        batch_op.create_foreign_key(op.f("fk_chunks_batch_id_batches"), "batches", ["batch_id"], ["id"],
                                    ondelete="CASCADE")
        batch_op.create_foreign_key(op.f("fk_chunks_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"],
                                    ondelete="CASCADE")
        batch_op.drop_index("ix_chunks_finished_at_claimed_at")
        batch_op.create_index(op.f("ix_chunks_batch_id"), ["batch_id"], unique=False)
        for column in ("priority_rank", "share", "gpu_seconds", "finished_at", "claimed_by", "claimed_at",
                       "cost_key", "job_count"):
            batch_op.drop_column(column)
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_constraint(op.f("ck_batches_priority"), type_="check")
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("priority")
    with op.batch_alter_table("tenants") as batch_op:
        for column in ("monthly_gpu_seconds", "max_running_chunks", "max_waiting_jobs", "requests_per_minute",
                       "weight"):
            batch_op.drop_column(column)
    op.drop_table("workers")
    op.drop_table("leases")
    op.drop_table("job_costs")
