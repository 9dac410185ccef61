"""Rows written below the cursor: each cursor counts the rows its generation consumed
and keeps what the last count of the rows at or below it found beyond that (shown by
``status`` and the metrics; scored with ``anomaly-monitor backfill``); batches record
their cursor generation, so that a backfill skips exactly the ids a batch of the
current generation already read.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CURSOR_COLUMNS = ("rows_consumed", "below_floor", "rows_below", "below_checked_at")


def upgrade() -> None:
    with op.batch_alter_table("am_cursors") as batch:
        batch.add_column(sa.Column("rows_consumed", sa.BigInteger, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("below_floor", sa.BigInteger))
        batch.add_column(sa.Column("rows_below", sa.BigInteger))
        batch.add_column(sa.Column("below_checked_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("am_batches") as batch:
        batch.add_column(sa.Column("generation", sa.Integer, nullable=False,
                                   server_default="0"))
    # Earlier batches did not record their generation: they are taken to be of the
    # cursor's current one (a reset is rare; a backfill then skips, never repeats, ids).
    bind = op.get_bind()
    cursors = sa.table("am_cursors", sa.column("monitor"), sa.column("generation"))
    batches = sa.table("am_batches", sa.column("monitor"), sa.column("generation"))
    bind.execute(batches.update().values(generation=sa.select(cursors.c.generation)
                                         .where(cursors.c.monitor == batches.c.monitor)
                                         .scalar_subquery())
                 .where(sa.exists().where(cursors.c.monitor == batches.c.monitor,
                                          cursors.c.generation > 0)))


def downgrade() -> None:
    with op.batch_alter_table("am_batches") as batch:
        batch.drop_column("generation")
    with op.batch_alter_table("am_cursors") as batch:
        for name in reversed(CURSOR_COLUMNS):
            batch.drop_column(name)
