"""The SQLite reader process: its framing, its errors, and its end."""

from __future__ import annotations

import sqlite3

import pytest

from anomaly_monitor.reading.backends import BackendError, ChildBackend


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "source.db"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x REAL)")
        connection.executemany("INSERT INTO t VALUES (?, ?)", [(i, i / 2) for i in range(1, 101)])
    return path


def test_the_reader_process_returns_tables_and_sees_new_commits(database):
    backend = ChildBackend(str(database), 5000)
    try:
        table = backend.submit("SELECT id, x FROM t WHERE id > 90 ORDER BY id", 10).result()
        assert table.column("id").to_pylist() == list(range(91, 101))
        assert table.column("x").to_pylist()[-1] == 50.0
        with sqlite3.connect(database) as connection:  # this process writes meanwhile
            connection.execute("INSERT INTO t VALUES (101, 0.25)")
        table = backend.submit("SELECT count(*) AS n FROM t", 10).result()
        assert table.column("n").to_pylist() == [101]
    finally:
        backend.close()
    with sqlite3.connect(database) as connection:  # the database is intact afterwards
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("SELECT count(*) FROM t").fetchone() == (101,)


def test_a_failing_query_is_reported_and_the_process_serves_on(database):
    backend = ChildBackend(str(database), 5000)
    try:
        with pytest.raises(BackendError, match="no_such_table"):
            backend.submit("SELECT * FROM no_such_table", 10).result()
        assert backend.submit("SELECT 1 AS one", 10).result().num_rows == 1
    finally:
        backend.close()


SLOW = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 50000000) "
        "SELECT max(x) AS n FROM c")


def test_a_reader_process_dying_mid_query_is_an_error_and_is_restarted(database):
    backend = ChildBackend(str(database), 5000)
    try:
        backend.submit("SELECT 1 AS one", 10).result()
        pending = backend.submit(SLOW, 10)
        backend._process.kill()
        with pytest.raises(BackendError, match="reader process failed"):
            pending.result()
        assert backend.submit("SELECT 2 AS two", 10).result().column(0).to_pylist() == [2]
    finally:
        backend.close()
    assert backend._process is None


def test_the_postgresql_connection_string_keeps_the_engines_timeouts():
    from anomaly_monitor.db import create_engine
    from anomaly_monitor.reading.arrow import _postgresql_target

    engine = create_engine("postgresql://u:pw@db.example:5433/monitor"
                           "?options=-csearch_path%3Dother&prepare_threshold=0&sslmode=require")
    conninfo = _postgresql_target(engine)
    # The URL's own options are kept (they were dropped before), the timeouts added.
    assert "statement_timeout=60000" in conninfo and "search_path=other" in conninfo
    assert "prepare_threshold" not in conninfo  # psycopg's, not libpq's
    assert "sslmode=require" in conninfo and "port=5433" in conninfo


def test_the_urls_own_timeouts_win_over_the_built_in_ones():
    from sqlalchemy.engine import make_url

    from anomaly_monitor.db import postgresql_connect_args

    url = make_url("postgresql://u@h/db?options=-c%20statement_timeout%3D5000"
                   "%20--lock_timeout%3D100&connect_timeout=3")
    args = postgresql_connect_args(url)
    assert "statement_timeout=5000" in args["options"]
    assert "statement_timeout=60000" not in args["options"]
    assert "lock_timeout=100" in args["options"] and "-c lock_timeout" not in args["options"]
    assert "idle_in_transaction_session_timeout=" in args["options"]
    assert "connect_timeout" not in args  # the URL's 3 s stands
    assert args["application_name"].startswith("anomaly-monitor ")
