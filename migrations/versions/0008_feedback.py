"""Operator feedback: every label given (``am_feedback``, history kept) and the current
label of each flagged row (``am_anomalies.label``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "am_feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("monitor", sa.String(64), nullable=False),
        sa.Column("target", sa.String(8), nullable=False),
        sa.Column("target_id", sa.BigInteger, nullable=False),
        sa.Column("source_id", sa.BigInteger),
        sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
        sa.Column("label", sa.String(8), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("target IN ('flag', 'incident')", name="ck_am_feedback_target"),
        sa.CheckConstraint("label IN ('tp', 'fp')", name="ck_am_feedback_label"),
    )
    op.create_index("ix_am_feedback_monitor_target_target_id", "am_feedback",
                    ["monitor", "target", "target_id"])
    op.create_index("ix_am_feedback_monitor_label", "am_feedback", ["monitor", "label"])
    with op.batch_alter_table("am_anomalies") as batch:
        batch.add_column(sa.Column("label", sa.String(8)))
        batch.create_index("ix_am_anomalies_monitor_label", ["monitor", "label"])


def downgrade() -> None:
    with op.batch_alter_table("am_anomalies") as batch:
        batch.drop_index("ix_am_anomalies_monitor_label")
        batch.drop_column("label")
    op.drop_index("ix_am_feedback_monitor_label", "am_feedback")
    op.drop_index("ix_am_feedback_monitor_target_target_id", "am_feedback")
    op.drop_table("am_feedback")
