"""The am_ tables: model versions, cursors, anomalies, quarantine, batches.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
BIGID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
NAME = 64


def upgrade() -> None:
    op.create_table(
        "am_model_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("monitor", sa.String(NAME), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("features", JSON, nullable=False),
        sa.Column("hyperparameters", JSON, nullable=False),
        sa.Column("manifest", JSON, nullable=False),
        sa.Column("artifact", sa.LargeBinary, nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("threshold_method", sa.String(16), nullable=False),
        sa.Column("threshold_params", JSON, nullable=False),
        sa.Column("severity_scale", JSON, nullable=False),
        sa.Column("calibration_scores", sa.LargeBinary, nullable=False),
        sa.Column("training", JSON, nullable=False),
        sa.Column("validation", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("activated_at", TIMESTAMP),
        sa.PrimaryKeyConstraint("id", name="pk_am_model_versions"),
        sa.UniqueConstraint("monitor", "version", name="uq_am_model_versions_monitor_version"),
        sa.CheckConstraint(
            "status IN ('candidate', 'active', 'retired')", name="ck_am_model_versions_status"
        ),
    )
    op.create_index(
        "uq_am_model_versions_one_active", "am_model_versions", ["monitor"], unique=True,
        sqlite_where=sa.text("status = 'active'"), postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "am_cursors",
        sa.Column("monitor", sa.String(NAME), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("pause_reason", sa.Text),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("monitor", name="pk_am_cursors"),
    )
    op.create_table(
        "am_anomalies",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("monitor", sa.String(NAME), nullable=False),
        sa.Column("source_id", sa.BigInteger, nullable=False),
        sa.Column("source_timestamp", TIMESTAMP),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("severity", sa.Float, nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("contributions", JSON, nullable=False),
        sa.Column("scored_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_am_anomalies"),
        sa.UniqueConstraint("monitor", "source_id", name="uq_am_anomalies_monitor_source_id"),
    )
    op.create_index(
        "ix_am_anomalies_monitor_scored_at", "am_anomalies", ["monitor", "scored_at"]
    )
    op.create_table(
        "am_quarantine",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("monitor", sa.String(NAME), nullable=False),
        sa.Column("source_id", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("raw_values", JSON, nullable=False),
        sa.Column("quarantined_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_am_quarantine"),
        sa.UniqueConstraint("monitor", "source_id", name="uq_am_quarantine_monitor_source_id"),
    )
    op.create_table(
        "am_batches",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("monitor", sa.String(NAME), nullable=False),
        sa.Column("first_id", sa.BigInteger, nullable=False),
        sa.Column("last_id", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("flagged", sa.Integer, nullable=False),
        sa.Column("quarantined", sa.Integer, nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("duration_seconds", sa.Float, nullable=False),
        sa.Column("newest_timestamp", TIMESTAMP),
        sa.PrimaryKeyConstraint("id", name="pk_am_batches"),
    )
    op.create_index(
        "ix_am_batches_monitor_started_at", "am_batches", ["monitor", "started_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_am_batches_monitor_started_at", table_name="am_batches")
    op.drop_table("am_batches")
    op.drop_table("am_quarantine")
    op.drop_index("ix_am_anomalies_monitor_scored_at", table_name="am_anomalies")
    op.drop_table("am_anomalies")
    op.drop_table("am_cursors")
    op.drop_index("uq_am_model_versions_one_active", table_name="am_model_versions")
    op.drop_table("am_model_versions")
