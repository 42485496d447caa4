"""Radiologists' corrections: one row per correction of a job's mask, with who sent it and what it changed; the
files (the corrected label map and the scan, on the scan's grid) lie under the storage root's corrections/, out
of the retention policy's reach.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "corrections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("folder", sa.String(255), nullable=False),
        sa.Column("label_sha256", sa.String(64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
    )
    op.create_index("ix_corrections_tenant_model", "corrections", ["tenant", "model", "created"])
    op.create_index("ix_corrections_job", "corrections", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_corrections_job", table_name="corrections")
    op.drop_index("ix_corrections_tenant_model", table_name="corrections")
    op.drop_table("corrections")
