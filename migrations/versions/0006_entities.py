"""Window monitors: per-entity states (``am_entity_states``) and the entity of each
flagged row (``am_anomalies.entity``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "am_entity_states",
        sa.Column("monitor", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("entity", sa.String(200), primary_key=True),
        sa.Column("samples", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("last_id", sa.BigInteger),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("am_anomalies") as batch:
        batch.add_column(sa.Column("entity", sa.String(200)))
        batch.create_index("ix_am_anomalies_monitor_entity", ["monitor", "entity"])


def downgrade() -> None:
    with op.batch_alter_table("am_anomalies") as batch:
        batch.drop_index("ix_am_anomalies_monitor_entity")
        batch.drop_column("entity")
    op.drop_table("am_entity_states")
