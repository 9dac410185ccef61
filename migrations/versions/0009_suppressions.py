"""Suppression windows (``am_suppressions``) and the window that suppressed a flag
(``am_anomalies.suppressed_by``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    stamp = sa.DateTime(timezone=True)
    op.create_table(
        "am_suppressions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("monitor", sa.String(64), nullable=False),
        sa.Column("entity", sa.String(200)),
        sa.Column("start_at", stamp, nullable=False),
        sa.Column("end_at", stamp, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("skip_training", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("created_at", stamp, nullable=False),
        sa.Column("removed_at", stamp),
        sa.CheckConstraint("end_at > start_at", name="ck_am_suppressions_span"),
    )
    op.create_index("ix_am_suppressions_monitor_end_at", "am_suppressions",
                    ["monitor", "end_at"])
    with op.batch_alter_table("am_anomalies") as batch:
        batch.add_column(sa.Column("suppressed_by", sa.String(100)))


def downgrade() -> None:
    with op.batch_alter_table("am_anomalies") as batch:
        batch.drop_column("suppressed_by")
    op.drop_index("ix_am_suppressions_monitor_end_at", "am_suppressions")
    op.drop_table("am_suppressions")
