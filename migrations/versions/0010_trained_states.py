"""The entity states a window monitor's version was trained to (``am_trained_states``),
kept apart from the states scoring moves, so that ``backtest`` replays from them.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "am_trained_states",
        sa.Column("monitor", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("entity", sa.String(200), primary_key=True),
        sa.Column("samples", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("last_id", sa.BigInteger),
    )


def downgrade() -> None:
    op.drop_table("am_trained_states")
