"""Alembic migrations of the ``am_`` tables, run on a connection of ours."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

VERSION_TABLE = "am_alembic_version"
#: PostgreSQL advisory lock key held while migrating, so that replicas starting at
#: once (e.g. Kubernetes init containers) migrate one after the other.
MIGRATION_LOCK_KEY = 0x616D6D6967  # "ammig"


def _lock(connection: sa.Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                           {"key": MIGRATION_LOCK_KEY})


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations, sharing ``connection``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("anomaly_monitor.migrations")))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Migrate the database up to ``revision``."""
    from alembic import command

    with engine.begin() as connection:
        _lock(connection)
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: sa.Engine, revision: str = "-1") -> None:
    """Migrate the database down to ``revision`` (``base`` drops every ``am_`` table)."""
    from alembic import command

    with engine.begin() as connection:
        _lock(connection)
        command.downgrade(alembic_config(connection), revision)


def downgrade_target(engine: sa.Engine, revision: str) -> str | None:
    """The revision ``db downgrade REVISION`` would end at (``None``: base, no tables);
    ``ValueError`` for a revision that does not exist or a relative step past base.
    (Alembic itself refuses a target above the current revision.)"""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    current = current_revision(engine)
    if revision == "base":
        return None
    if revision.startswith("-") and revision[1:].isdigit():
        target = current
        for _ in range(int(revision[1:])):
            if target is None:
                raise ValueError(f"cannot go down {revision[1:]} revision(s) from "
                                 f"{current or 'base'}")
            down = script.get_revision(target).down_revision
            target = down if isinstance(down, str) or down is None else down[0]
        return target
    try:
        found = script.get_revision(revision)
    except Exception:  # alembic's own errors for an unknown or ambiguous revision
        found = None
    if found is None:
        raise ValueError(f"no revision {revision!r} (known: "
                         f"{', '.join(r.revision for r in script.walk_revisions())}, base)")
    return found.revision


def current_revision(engine: sa.Engine) -> str | None:
    """The revision the database is at, ``None`` before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped with this release."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
