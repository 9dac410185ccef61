"""Worker leases on am_cursors; batch kinds and id gaps on am_batches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("am_cursors") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(200)))
        batch.add_column(sa.Column("lease_token", sa.BigInteger, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("am_batches") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False,
                                   server_default="window"))
        batch.add_column(sa.Column("gaps", JSON))
        batch.add_column(sa.Column("open_gaps", JSON))


def downgrade() -> None:
    with op.batch_alter_table("am_batches") as batch:
        batch.drop_column("open_gaps")
        batch.drop_column("gaps")
        batch.drop_column("kind")
    with op.batch_alter_table("am_cursors") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_token")
        batch.drop_column("lease_owner")
