"""Alembic migrations: up, down and up again; the result matches tables.py exactly."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from anomaly_monitor import migrate
from anomaly_monitor.db import create_engine
from anomaly_monitor.tables import metadata

AM_TABLES = {"am_model_versions", "am_cursors", "am_anomalies", "am_quarantine", "am_batches",
             "am_activations", "am_standbys", "am_entity_states", "am_incidents",
             "am_feedback", "am_suppressions", "am_trained_states", "am_drift",
             "am_shadow_batches"}


def am_tables(engine):
    return {t for t in sa.inspect(engine).get_table_names() if t.startswith("am_")}


def test_upgrade_downgrade_upgrade(bare_db_url):
    engine = create_engine(bare_db_url)
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert am_tables(engine) == AM_TABLES | {migrate.VERSION_TABLE}
    migrate.downgrade(engine, "base")
    assert am_tables(engine) == {migrate.VERSION_TABLE}
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()


def test_migrated_schema_matches_the_table_definitions(db_url):
    engine = create_engine(db_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={
            "compare_type": True, "version_table": migrate.VERSION_TABLE,
            "include_name": lambda name, kind, _: kind != "table" or name.startswith("am_"),
        })
        diffs = compare_metadata(context, metadata)
    engine.dispose()
    assert diffs == []


def test_user_tables_are_left_alone(bare_db_url):
    engine = create_engine(bare_db_url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        connection.execute(sa.text("INSERT INTO alembic_version VALUES ('users_own')"))
    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() \
            == "users_own"
    engine.dispose()


def test_replicas_migrating_at_once_all_succeed(bare_db_url, tmp_path):
    import os
    import subprocess
    import sys

    if not bare_db_url.startswith("postgresql"):
        pytest.skip("replicas share PostgreSQL; a SQLite file is served by one worker")
    config = tmp_path / "monitor.toml"
    config.write_text(f'[database]\nurl = "{bare_db_url}"\n')
    processes = [subprocess.Popen([sys.executable, "-m", "anomaly_monitor", "--config",
                                   str(config), "db", "upgrade"], env=dict(os.environ),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    engine = create_engine(bare_db_url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()
