"""Incidents: flags of a monitor (and entity) that follow each other within a gap
(``am_incidents``), and the incident of each flagged row (``am_anomalies.incident_id``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    stamp = sa.DateTime(timezone=True)
    op.create_table(
        "am_incidents",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("monitor", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
        sa.Column("entity", sa.String(200)),
        sa.Column("first_source_id", sa.BigInteger, nullable=False),
        sa.Column("last_source_id", sa.BigInteger, nullable=False),
        sa.Column("first_timestamp", stamp),
        sa.Column("last_timestamp", stamp),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("max_severity", sa.Float, nullable=False),
        sa.Column("feature_shares", json, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("label", sa.String(8)),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("opened_at", stamp, nullable=False),
        sa.Column("updated_at", stamp, nullable=False),
        sa.Column("closed_at", stamp),
        sa.CheckConstraint("state IN ('open', 'closed')", name="ck_am_incidents_state"),
        sa.CheckConstraint("label IS NULL OR label IN ('tp', 'fp')",
                           name="ck_am_incidents_label"),
    )
    op.create_index("ix_am_incidents_monitor_state_generation", "am_incidents",
                    ["monitor", "state", "generation"])
    op.create_index("ix_am_incidents_monitor_generation_last_timestamp", "am_incidents",
                    ["monitor", "generation", "last_timestamp"])
    op.create_index("ix_am_incidents_monitor_closed_at", "am_incidents",
                    ["monitor", "closed_at"])
    with op.batch_alter_table("am_anomalies") as batch:
        batch.add_column(sa.Column("incident_id", sa.BigInteger))
        batch.create_index("ix_am_anomalies_incident_id", ["incident_id"])


def downgrade() -> None:
    with op.batch_alter_table("am_anomalies") as batch:
        batch.drop_index("ix_am_anomalies_incident_id")
        batch.drop_column("incident_id")
    op.drop_index("ix_am_incidents_monitor_closed_at", "am_incidents")
    op.drop_index("ix_am_incidents_monitor_generation_last_timestamp", "am_incidents")
    op.drop_index("ix_am_incidents_monitor_state_generation", "am_incidents")
    op.drop_table("am_incidents")
