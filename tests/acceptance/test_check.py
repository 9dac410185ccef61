"""``check`` catches what ``train`` or ``run`` would trip over, for every monitor: a
missing grant, timestamps that do not parse, a view without a delay, a model whose
features the table no longer matches, am_ tables the user may not write."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from anomaly_monitor.cli import main
from anomaly_monitor.db import create_engine
from tests.helpers import FEATURES, monitor_settings, source_table, trained_plant


def _config(path, url: str, *monitors: str) -> str:
    text = f'[database]\nurl = "{url}"\n' + "".join(monitors)
    path.write_text(text)
    return str(path)


def _monitor(name: str, table: str, *, features: bool = True, extra: str = "") -> str:
    listed = ("features = [" + ", ".join(f'"{f}"' for f in FEATURES) + "]\n") if features \
        else ""
    return (f'[[monitor]]\nname = "{name}"\ntable = "{table}"\ntimestamp_column = "ts"\n'
            f"{listed}{extra}")


def check(config: str, expect: int) -> str:
    result = CliRunner().invoke(main, ["--config", config, "check"])
    assert result.exit_code == expect, result.output
    assert "Traceback" not in result.output
    return result.output


def test_every_monitor_is_checked_and_each_problem_named(engine, tmp_path):
    url = engine.url.render_as_string(hide_password=False)
    source_table(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE texts (id INTEGER PRIMARY KEY, ts TEXT, "
                                   + ", ".join(f"{f} REAL" for f in FEATURES) + ")"))
        connection.execute(sa.text(f"INSERT INTO texts VALUES (1, 'yesterday', "
                                   f"{', '.join('1.0' for _ in FEATURES)})"))
    config = _config(tmp_path / "am.toml", url, _monitor("missing", "nosuch"),
                     _monitor("plant", "readings"), _monitor("texts", "texts"))
    out = check(config, 2)
    assert "table 'nosuch' does not exist" in out  # the first problem ...
    assert "monitor plant: table readings ok" in out  # ... does not stop the others
    assert "timestamp_column 'ts' holds 1 of its newest 1 values that are not times" in out
    assert "'yesterday'" in out and "check found 2 problem(s)" in out


def test_a_column_added_after_training_is_named(engine, tmp_path):
    monitor = monitor_settings(features=None)
    trained_plant(engine, monitor)
    url = engine.url.render_as_string(hide_password=False)
    config = _config(tmp_path / "am.toml", url, _monitor("plant", "readings", features=False))
    check(config, 0)
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE readings ADD COLUMN f_new REAL"))
    out = check(config, 2)
    assert "trained on 7 features, the table now offers 8 (new: f_new)" in out
    assert "anomaly-monitor train plant" in out


def test_epoch_milliseconds_are_detected_and_a_wrong_unit_is_refused(engine, tmp_path):
    url = engine.url.render_as_string(hide_password=False)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE ms (id INTEGER PRIMARY KEY, ts BIGINT, "
                                   + ", ".join(f"{f} REAL" for f in FEATURES) + ")"))
        connection.execute(sa.text(f"INSERT INTO ms VALUES (1, 1767225600000, "
                                   f"{', '.join('1.0' for _ in FEATURES)})"))
    out = check(_config(tmp_path / "a.toml", url, _monitor("ms", "ms")), 0)
    assert "epoch numbers in ms (detected), newest 2026-01-01T00:00:00+00:00" in out
    out = check(_config(tmp_path / "b.toml", url,
                        _monitor("ms", "ms", extra='timestamp_unit = "s"\n')), 2)
    assert "not times (e.g. 1767225600000)" in out


@pytest.fixture
def restricted(pg_server, pg_url):
    """A PostgreSQL user without the SELECT grant on the source table, and one that may
    only read the am_ tables."""
    engine = create_engine(pg_url)
    source_table(engine)
    reader, nobody = f"r_{uuid.uuid4().hex[:8]}", f"n_{uuid.uuid4().hex[:8]}"
    with engine.begin() as connection:
        for user in (reader, nobody):
            connection.execute(sa.text(f"CREATE ROLE {user} LOGIN"))
        connection.execute(sa.text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {reader}"))
        connection.execute(sa.text(f"GRANT SELECT ON am_alembic_version TO {nobody}"))
        connection.execute(sa.text(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {nobody}"))
        connection.execute(sa.text(f"REVOKE ALL ON readings FROM {nobody}"))
    database = pg_url.rsplit("/", 1)[1]
    yield pg_server.url(database, reader), pg_server.url(database, nobody)
    with engine.begin() as connection:
        for user in (reader, nobody):
            connection.execute(sa.text(f"DROP OWNED BY {user}"))
            connection.execute(sa.text(f"DROP ROLE {user}"))
    engine.dispose()


def test_missing_grants_are_named(restricted, tmp_path):
    select_only, no_source = restricted
    out = check(_config(tmp_path / "a.toml", select_only, _monitor("plant", "readings")), 2)
    assert "lacks INSERT on am_cursors" in out and "UPDATE on am_batches" in out
    out = check(_config(tmp_path / "b.toml", no_source, _monitor("plant", "readings")), 2)
    assert "may not read table 'readings'" in out and "GRANT SELECT ON readings" in out
    assert "am_ tables: writable" in out


def test_run_refuses_a_user_that_cannot_write_the_am_tables(restricted, tmp_path):
    select_only, _ = restricted
    config = _config(tmp_path / "a.toml", select_only, "[metrics]\nport = 0\n",
                     _monitor("plant", "readings"))
    for args in (["run", "--once"], ["run"]):
        result = CliRunner().invoke(main, ["--config", config, *args])
        assert result.exit_code == 2, result.output
        assert "cannot run: this database user lacks INSERT on am_cursors" in result.output
        assert "Traceback" not in result.output


def test_a_pause_that_cannot_be_written_is_not_shown_as_one(restricted, pg_url):
    from prometheus_client import CollectorRegistry

    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.metrics import Metrics
    from anomaly_monitor.runner import PAUSE_AFTER_FAILURES
    from anomaly_monitor.worker import Worker
    from tests.helpers import Sensors, _fit_once, bulk_insert, settings

    owner = create_engine(pg_url)
    bulk_insert(owner, source_table_of(owner), Sensors(seed=2).normal(300))
    monitor = monitor_settings()
    with _fit_once():
        train_monitor(owner, monitor, device="cpu")
    select_only = create_engine(restricted[0])
    worker = Worker(settings(restricted[0], monitor), select_only,
                    Metrics(CollectorRegistry()), device="cpu")
    for _ in range(PAUSE_AFTER_FAILURES + 1):
        worker.runners["plant"].state.retry_at = 0.0  # no backoff wait in the test
        state = worker.poll("plant", budget_seconds=0)
    registry = worker.metrics.registry
    assert state.status == "error" and "permission denied" in (state.detail or "")
    assert registry.get_sample_value("anomaly_monitor_paused", {"monitor": "plant"}) == 0
    assert registry.get_sample_value("anomaly_monitor_batches_total", {
        "monitor": "plant", "outcome": "error"}) == PAUSE_AFTER_FAILURES + 1
    with owner.connect() as connection:  # what status shows: not paused, as the metric
        assert not connection.execute(sa.text(
            "SELECT paused FROM am_cursors WHERE monitor = 'plant'")).scalar()
    select_only.dispose()
    owner.dispose()


def source_table_of(engine: sa.Engine) -> sa.Table:
    return sa.Table("readings", sa.MetaData(), autoload_with=engine)


def test_a_postgresql_view_needs_a_query_delay(pg_url, tmp_path):
    engine = create_engine(pg_url)
    source_table(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE VIEW recent AS SELECT * FROM readings"))
    out = check(_config(tmp_path / "a.toml", pg_url, _monitor("v", "recent")), 2)
    assert "'recent' is a view" in out and "set query_delay_seconds" in out
    out = check(_config(tmp_path / "b.toml", pg_url,
                        _monitor("v", "recent", extra="query_delay_seconds = 60\n")), 0)
    assert "monitor v: view recent ok" in out
    engine.dispose()
