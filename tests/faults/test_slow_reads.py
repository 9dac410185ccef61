"""Reads slower than the statement timeout (a costly view or row-level-security policy).

A window that runs past the timeout is read again in smaller windows, down to one
row; a row that still cannot be read is quarantined when its id can be read alone,
else the monitor pauses with the reason until it can. The URL's own timeout wins
over the built-in one, and a stop cancels a slow read instead of waiting for it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.below import backfill
from anomaly_monitor.cursors import lease_holder, read_cursor
from anomaly_monitor.db import create_engine
from anomaly_monitor.lifecycle import train_monitor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.tables import anomalies, quarantine
from anomaly_monitor.worker import Worker
from tests.helpers import (
    FEATURES,
    Sensors,
    _fit_once,
    bulk_insert,
    insert_rows,
    monitor_settings,
    pause_info,
    rows_in_batches,
    settings,
    source_table,
    wait_for,
)

#: ``pause_at(id)`` sleeps for the seconds ``slow_rows`` holds for that id.
SLOW_SQL = """
CREATE TABLE slow_rows (id bigint PRIMARY KEY, seconds float NOT NULL);
CREATE FUNCTION pause_at(i bigint) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
DECLARE s float;
BEGIN
  SELECT seconds INTO s FROM slow_rows WHERE id = i;
  IF s IS NOT NULL THEN PERFORM pg_sleep(s); END IF;
  RETURN true;
END $$;
-- slow values: reading a row's f0 costs its pause; reading its id alone does not
CREATE VIEW slow_values AS SELECT id, ts, CASE WHEN pause_at(id) THEN f0 END AS f0,
  f1, f2, f3, f4, f5, label FROM readings;
-- slow rows: even the id of a row costs its pause
CREATE VIEW slow_filter AS SELECT * FROM readings WHERE pause_at(id);
"""
TIMEOUT_QUERY = "?options=-c%20statement_timeout%3D1000"  # 1 s


def _slow_plant(pg_url: str, view: str, batch_size: int):
    """600 rows of history, the slow views over them and a model trained through
    ``view`` (nothing is slow yet); an engine whose statements time out after 1 s."""
    engine = create_engine(pg_url)
    table = source_table(engine)
    sensors = Sensors(seed=8)
    bulk_insert(engine, table, sensors.normal(600),
                start=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    with engine.begin() as connection:
        connection.connection.dbapi_connection.execute(SLOW_SQL)
    monitor = monitor_settings(name="slow", table=view, query_delay_seconds=1.0,
                               batch_size=batch_size)
    with _fit_once():
        train_monitor(engine, monitor, device="cpu")
    engine.dispose()
    url = pg_url + TIMEOUT_QUERY
    timed = create_engine(url)
    worker = Worker(settings(url, monitor), timed, Metrics(CollectorRegistry()), device="cpu")
    return timed, table, sensors, worker


def _slow(engine: sa.Engine, seconds_by_id: dict[int, float]) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO slow_rows VALUES (:id, :s)"),
                           [{"id": i, "s": s} for i, s in seconds_by_id.items()])


def test_the_urls_statement_timeout_wins_on_the_server(pg_url):
    for url, expected in ((pg_url, "1min"),
                          (pg_url + "?options=-c%20statement_timeout%3D5000", "5s")):
        engine = create_engine(url)
        with engine.connect() as connection:
            assert connection.execute(sa.text("SHOW statement_timeout")).scalar() == expected
        engine.dispose()


def test_a_statement_timeout_is_recognised_through_both_readers(pg_url):
    from anomaly_monitor.reading.arrow import _postgresql_target
    from anomaly_monitor.reading.backends import connect_postgresql
    from anomaly_monitor.reading.cancel import is_query_canceled

    engine = create_engine(pg_url + TIMEOUT_QUERY)
    errors = []
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_sleep(3)"))
    except sa.exc.OperationalError as exc:
        errors.append(exc)
    target = _postgresql_target(engine)
    assert target is not None
    arrow = connect_postgresql(target)
    try:
        arrow.query("SELECT pg_sleep(3)")
    except Exception as exc:
        errors.append(exc)
    finally:
        arrow.close()
    assert len(errors) == 2 and all(is_query_canceled(e) for e in errors)
    assert not is_query_canceled(ValueError("canceling statement due to statement timeout"))
    engine.dispose()


def test_windows_shrink_until_a_slow_view_reads_in_time(pg_url, caplog):
    engine, table, sensors, worker = _slow_plant(pg_url, "slow_values", batch_size=1000)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    ids = insert_rows(engine, table, sensors.normal(300), start=old, step_seconds=1)
    _slow(engine, {i: 0.02 for i in ids})  # 1000 rows: 20 s; 100: 2 s; 10: 0.2 s
    with caplog.at_level(logging.WARNING, logger="anomaly_monitor"):
        state = worker.poll("slow", budget_seconds=float("inf"))
    assert (state.status, state.rows, state.quarantined) == ("running", 300, 0), state.detail
    assert rows_in_batches(engine) == 300
    assert "reading 1000 rows after id 600 ran past the statement timeout; reading 100" \
        in caplog.text
    assert "ran past the statement timeout; reading 10 at a time" in caplog.text
    # Windows grow back, but stay under the size that timed out.
    assert 10 < worker.runners["slow"].state.read_state.limit(1000) <= 50
    engine.dispose()


def test_a_row_that_cannot_be_read_in_time_is_quarantined(pg_url, caplog):
    engine, table, sensors, worker = _slow_plant(pg_url, "slow_values", batch_size=100)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    ids = insert_rows(engine, table, sensors.normal(100), start=old, step_seconds=1)
    _slow(engine, {ids[50]: 3.0})
    with caplog.at_level(logging.WARNING, logger="anomaly_monitor"):
        state = worker.poll("slow", budget_seconds=float("inf"))
    assert (state.status, state.rows, state.quarantined) == ("running", 100, 1), state.detail
    with engine.connect() as connection:
        bad = connection.execute(sa.select(quarantine.c.source_id, quarantine.c.reason)).all()
        cursor = read_cursor(connection, "slow")
        flagged = connection.execute(sa.select(anomalies.c.source_id)).scalars().all()
    assert bad == [(ids[50], "read_timeout")]
    assert cursor is not None and cursor.position == ids[-1] and not cursor.paused
    assert ids[50] not in flagged
    assert f"row {ids[50]} cannot be read within the statement timeout" in caplog.text
    # One slow row, not a slow table: windows are full-sized again after it.
    assert worker.runners["slow"].state.read_state.limit(100) == 100
    # Once it reads in time, a backfill scores it and takes it out of quarantine.
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM slow_rows"))
    runner = worker.runners["slow"]
    results = backfill(engine, runner.monitor, runner._source(), worker.models, ids[0],
                       ids[-1])
    assert results.rows == 1
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(quarantine)).scalar() == 0
    assert worker.metrics.registry.get_sample_value(
        "anomaly_monitor_rows_quarantined_total",
        {"monitor": "slow", "reason": "read_timeout"}) == 1
    engine.dispose()


def test_a_read_cancelled_by_someone_else_is_retried_not_shrunk(pg_url):
    engine, table, sensors, _ = _slow_plant(pg_url, "slow_values", batch_size=100)
    url = pg_url + "?options=-c%20statement_timeout%3D30000"  # 30 s
    slow = create_engine(url)
    runner = Worker(settings(url, _monitor_of(engine)), slow, Metrics(CollectorRegistry()),
                    device="cpu").runners["slow"]
    ids = insert_rows(engine, table, sensors.normal(20),
                      start=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), step_seconds=1)
    _slow(engine, {ids[5]: 20.0})
    poll = threading.Thread(target=lambda: runner.poll(budget_seconds=0))
    poll.start()
    query = ("SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE "
             "'%slow_values%' AND pid <> pg_backend_pid()")

    def reading() -> bool:
        with engine.connect() as connection:
            return connection.execute(sa.text(query)).first() is not None

    wait_for(reading, timeout=30)
    with engine.connect() as connection:  # a DBA's pg_cancel_backend, long before 30 s
        connection.execute(sa.text(f"SELECT pg_cancel_backend(({query}))"))
    poll.join(timeout=30)
    state = runner.state
    assert state.status == "error" and state.read_state.slow_rows is None
    assert "canceling statement" in (state.detail or "")
    slow.dispose()
    engine.dispose()


def _monitor_of(engine: sa.Engine):
    return monitor_settings(name="slow", table="slow_values", query_delay_seconds=1.0,
                            batch_size=100)


def test_a_row_whose_id_cannot_be_read_in_time_pauses_until_it_can(pg_url):
    engine, table, sensors, worker = _slow_plant(pg_url, "slow_filter", batch_size=100)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    ids = insert_rows(engine, table, sensors.normal(40), start=old, step_seconds=1)
    _slow(engine, {ids[20]: 3.0})
    state = worker.poll("slow", budget_seconds=float("inf"))
    assert state.status == "paused" and state.rows == 20
    assert state.detail.startswith(f"reads time out: the row after id {ids[19]}")
    assert "statement_timeout" in state.detail
    with engine.connect() as connection:
        cursor = read_cursor(connection, "slow")
    assert cursor is not None and cursor.pause_reason == state.detail
    registry = worker.metrics.registry
    assert registry.get_sample_value("anomaly_monitor_paused", {"monitor": "slow"}) == 1
    assert worker.poll("slow").status == "paused"  # re-checked, still too slow
    [info] = pause_info(registry, "slow")
    assert info["cause"] == "slow_reads" and info["reason"].startswith("reads time out")
    with engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM slow_rows"))  # the operator fixes the view
    state = worker.poll("slow", budget_seconds=float("inf"))
    assert (state.status, state.rows, state.quarantined) == ("running", 40, 0), state.detail
    assert registry.get_sample_value("anomaly_monitor_paused", {"monitor": "slow"}) == 0
    assert pause_info(registry, "slow") == []  # no pause_info series once it runs
    engine.dispose()


def test_sigterm_cancels_a_slow_read_and_stops_within_10_seconds(pg_url, tmp_path):
    engine, table, sensors, _ = _slow_plant(pg_url, "slow_values", batch_size=100)
    engine.dispose()
    engine = create_engine(pg_url)  # the daemon keeps the built-in 60 s timeout
    ids = insert_rows(engine, table, sensors.normal(20),
                      start=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), step_seconds=1)
    _slow(engine, {ids[0]: 50.0})
    config = tmp_path / "am.toml"
    config.write_text(
        f'[database]\nurl = "{pg_url}"\n[metrics]\nport = 0\n'
        '[[monitor]]\nname = "slow"\ntable = "slow_values"\ntimestamp_column = "ts"\n'
        'query_delay_seconds = 1\ninterval_seconds = 1\nbatch_size = 100\n'
        f'features = [{", ".join(repr(f) for f in FEATURES)}]\n'.replace("'", '"'))
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "anomaly_monitor", "--config", str(config), "run"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def reading() -> bool:
            with engine.connect() as connection:
                return bool(connection.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE '%slow_values%' AND pid <> pg_backend_pid()")).scalar())

        wait_for(reading, timeout=60)
        start = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert rc == 0, text
    assert took < 10, (took, text)
    assert "cancelling the queries still running" in text and "stopped" in text
    with engine.connect() as connection:
        cursor = read_cursor(connection, "slow")
        holder = lease_holder(connection, "slow")
    assert holder is None and cursor is not None and cursor.position == 600
    engine.dispose()
