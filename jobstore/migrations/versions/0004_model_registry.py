"""The model registry: retraining jobs (a tenant's request for a new version of a model, trained on its base data
and every correction so far) and the versions they made, with lineage, validation figures and which one is live.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trainings",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
        sa.Column("beat", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(128), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
    )
    op.create_index("ix_trainings_tenant_model", "trainings", ["tenant", "model", "created"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("parent", sa.String(128), nullable=False),
        sa.Column("folder", sa.String(255), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("promoted", sa.DateTime(timezone=True), nullable=True),
        sa.Column("promoted_by", sa.String(80), nullable=False),
    )
    op.create_index("ix_model_versions_tenant_model", "model_versions", ["tenant", "model", "created"])
    op.create_index("ux_model_versions_tenant_version", "model_versions", ["tenant", "version"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_model_versions_tenant_version", table_name="model_versions")
    op.drop_index("ix_model_versions_tenant_model", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index("ix_trainings_tenant_model", table_name="trainings")
    op.drop_table("trainings")
