"""Model lifecycle: challengers in shadow (status ``shadow``/``rejected``, their per-batch
results in ``am_shadow_batches``), drift against the training reference (``am_drift``)
and retention (an artifact may be removed: ``artifact`` NULL, ``pruned_at``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)
OLD_STATUSES = "status IN ('candidate', 'active', 'retired')"
NEW_STATUSES = "status IN ('candidate', 'active', 'retired', 'shadow', 'rejected')"


def _json() -> sa.types.TypeEngine:
    from sqlalchemy.dialects import postgresql

    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("am_model_versions") as batch:
        batch.drop_constraint("ck_am_model_versions_status", type_="check")
        batch.create_check_constraint("ck_am_model_versions_status", sa.text(NEW_STATUSES))
        batch.alter_column("artifact", existing_type=sa.LargeBinary, nullable=True)
        batch.add_column(sa.Column("pruned_at", Timestamp))
    op.create_index("uq_am_model_versions_one_shadow", "am_model_versions", ["monitor"],
                    unique=True, sqlite_where=sa.text("status = 'shadow'"),
                    postgresql_where=sa.text("status = 'shadow'"))
    op.create_table(
        "am_drift",
        sa.Column("monitor", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("state", _json(), nullable=False),
        sa.Column("drift_score", sa.Float, nullable=False),
        sa.Column("drifted_features", sa.Integer, nullable=False),
        sa.Column("score_drift", sa.Float, nullable=False),
        sa.Column("report", _json(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_table(
        "am_shadow_batches",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("monitor", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("active_version", sa.Integer, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("first_id", sa.BigInteger, nullable=False),
        sa.Column("last_id", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("quarantined", sa.Integer, nullable=False),
        sa.Column("flagged", sa.Integer, nullable=False),
        sa.Column("active_flagged", sa.Integer, nullable=False),
        sa.Column("overlap", sa.Integer, nullable=False),
        sa.Column("agreed", sa.Integer, nullable=False),
        sa.Column("score_quantiles", _json(), nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("scored_at", Timestamp, nullable=False),
        sa.UniqueConstraint("monitor", "version", "generation", "last_id",
                            name="uq_am_shadow_batches_monitor_version_generation_last_id"),
    )


def downgrade() -> None:
    bind = op.get_bind()
    table = sa.table("am_model_versions", sa.column("status"), sa.column("artifact"))
    blocking = bind.execute(sa.select(sa.func.count()).select_from(table).where(
        sa.or_(table.c.status.in_(("shadow", "rejected")), table.c.artifact.is_(None)))).scalar()
    if blocking:
        raise ValueError(
            f"{blocking} model version(s) are challengers (shadow/rejected) or had their "
            "artifact removed by retention, which revision 0010 cannot hold; reject or "
            "delete them first, or stay at revision 0011")
    op.drop_table("am_shadow_batches")
    op.drop_table("am_drift")
    op.drop_index("uq_am_model_versions_one_shadow", table_name="am_model_versions")
    with op.batch_alter_table("am_model_versions") as batch:
        batch.drop_column("pruned_at")
        batch.alter_column("artifact", existing_type=sa.LargeBinary, nullable=False)
        batch.drop_constraint("ck_am_model_versions_status", type_="check")
        batch.create_check_constraint("ck_am_model_versions_status", sa.text(OLD_STATUSES))
