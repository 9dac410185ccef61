"""Alembic environment: runs on the caller's connection when one is given.

``anomaly-monitor db upgrade`` passes its connection in
``config.attributes["connection"]``; plain ``alembic`` falls back to the
``sqlalchemy.url`` option. Batch mode lets SQLite alter tables.
"""

from __future__ import annotations

from alembic import context

from anomaly_monitor.db import create_engine
from anomaly_monitor.tables import metadata

VERSION_TABLE = "am_alembic_version"


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate through the given connection, or one opened from the configured URL."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as new_connection:
        _run(new_connection)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
