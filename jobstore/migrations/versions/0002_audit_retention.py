"""The audit trail (who did what to which job, when) and the retention policy's mark on a job whose input and
results it deleted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("purged", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_jobs_finished", ["finished"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
    )
    op.create_index("ix_audit_tenant_at", "audit", ["tenant", "at"])
    op.create_index("ix_audit_job", "audit", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_job", table_name="audit")
    op.drop_index("ix_audit_tenant_at", table_name="audit")
    op.drop_table("audit")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_finished")
        batch.drop_column("purged")
