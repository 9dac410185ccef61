"""Cursor generations: a cursor reset below its position starts a new generation, so
that the rows of a table whose ids restarted are flagged under their own keys while
the records of the old rows are kept; the timestamp of the row at the cursor; the
history of model activations (am_activations), which rollback follows.

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


def _seed_activations() -> None:
    """The history so far, as far as it is known: each once-active version in the order
    of its last activation, the active one last."""
    bind = op.get_bind()
    versions = sa.table("am_model_versions", sa.column("monitor"), sa.column("version"),
                        sa.column("status"), sa.column("activated_at"))
    rows = bind.execute(sa.select(versions.c.monitor, versions.c.version, versions.c.status,
                                  versions.c.activated_at)
                        .where(versions.c.activated_at.is_not(None))).all()
    rows.sort(key=lambda r: (r.monitor, r.status == "active", r.activated_at))
    activations = sa.table("am_activations", sa.column("monitor"), sa.column("version"),
                           sa.column("action"), sa.column("at"))
    if rows:
        bind.execute(activations.insert(), [
            {"monitor": r.monitor, "version": r.version, "action": "activate",
             "at": r.activated_at} for r in rows])


def upgrade() -> None:
    op.create_table(
        "am_activations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("monitor", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_am_activations"),
    )
    op.create_index("ix_am_activations_monitor_id", "am_activations", ["monitor", "id"])
    _seed_activations()
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
    op.drop_index("ix_am_activations_monitor_id", table_name="am_activations")
    op.drop_table("am_activations")
