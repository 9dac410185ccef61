"""Cursor generations: a cursor reset below its position starts a new generation, so
that the rows of a table whose ids restarted are flagged under their own keys while
the records of the old rows are kept; the timestamp of the row at the cursor.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: The tables whose rows are keyed by (monitor, generation, source id).
KEYED = ("am_anomalies", "am_quarantine")


def upgrade() -> None:
    with op.batch_alter_table("am_cursors") as batch:
        batch.add_column(sa.Column("generation", sa.Integer, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("position_timestamp", sa.DateTime(timezone=True)))
    for table in KEYED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("generation", sa.Integer, nullable=False,
                                       server_default="0"))
            batch.drop_constraint(f"uq_{table}_monitor_source_id", type_="unique")
            batch.create_unique_constraint(f"uq_{table}_monitor_generation_source_id",
                                           ["monitor", "generation", "source_id"])


def downgrade() -> None:
    bind = op.get_bind()
    newer = {}
    for name in KEYED:
        table = sa.table(name, sa.column("generation"))
        newer[name] = bind.execute(sa.select(sa.func.count()).select_from(table)
                                   .where(table.c.generation > 0)).scalar()
    if any(newer.values()):
        counts = ", ".join(f"{n} in {table}" for table, n in newer.items())
        raise ValueError(
            f"rows of a cursor generation above 0 (written after a cursor reset): {counts}; "
            "revision 0002 cannot hold them apart from older rows with the same ids. Export "
            "them and delete the rows whose generation is above 0 from both tables first, "
            "or stay at revision 0003")
    for table in KEYED:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_monitor_generation_source_id", type_="unique")
            batch.create_unique_constraint(f"uq_{table}_monitor_source_id",
                                           ["monitor", "source_id"])
            batch.drop_column("generation")
    with op.batch_alter_table("am_cursors") as batch:
        batch.drop_column("position_timestamp")
        batch.drop_column("generation")
