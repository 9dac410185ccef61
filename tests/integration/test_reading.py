"""The Arrow (ADBC) read path returns the same windows as the plain SQLAlchemy path,
and hands over to it for values the driver cannot type, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import sqlalchemy as sa

from anomaly_monitor.batch import ReadState, run_batch
from anomaly_monitor.reading.arrow import ArrowReader
from anomaly_monitor.reading.values import Window
from anomaly_monitor.reading.windows import read_window
from anomaly_monitor.registry import ModelCache
from anomaly_monitor.source import reflect_source
from tests.helpers import FEATURES, Sensors, insert_rows, monitor_settings, trained_plant

BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _both(engine, source, after, limit, **kwargs) -> tuple[Window, Window, ArrowReader]:
    arrow = ArrowReader(engine)
    with engine.connect() as connection:
        plain = read_window(connection, source, after, limit, **kwargs)
        fast = read_window(connection, source, after, limit, arrow=arrow, **kwargs)
    arrow.close()
    return plain, fast, arrow


def _same(plain: Window, fast: Window) -> None:
    assert fast.ids.tolist() == plain.ids.tolist()
    np.testing.assert_array_equal(fast.values, plain.values)
    assert [(b.source_id, b.reason, b.detail, b.raw_values) for b in fast.bad] == \
        [(b.source_id, b.reason, b.detail, b.raw_values) for b in plain.bad]
    assert [fast.timestamp(i) for i in range(len(fast.ids))] == \
        [plain.timestamp(i) for i in range(len(plain.ids))]
    assert (fast.last_id, fast.held_back) == (plain.last_id, plain.held_back)


@pytest.fixture
def table(engine):
    from tests.helpers import source_table

    table = source_table(engine)
    with engine.connect() as connection:
        source = reflect_source(connection, monitor_settings())
    return table, source


def test_arrow_and_plain_windows_agree_including_quarantined_rows(engine, table):
    table, source = table
    rows = [list(r) for r in Sensors().normal(40)]
    rows[3][1] = None
    rows[7][0] = float("inf")
    rows[9][5] = float("-inf")
    if engine.dialect.name == "postgresql":  # SQLite stores NaN as NULL
        rows[11][2] = float("nan")
    ids = insert_rows(engine, table, rows, start=BASE)
    plain, fast, arrow = _both(engine, source, ids[0], 30)
    assert arrow.fetches == 1, "the Arrow path was not used"
    _same(plain, fast)
    reasons = {b.source_id: b.reason for b in fast.bad}
    assert reasons[ids[3]] == "null" and reasons[ids[7]] == "infinite"
    assert reasons[ids[9]] == "infinite"
    if engine.dialect.name == "postgresql":
        assert reasons[ids[11]] == "nan"
    assert fast.size == 30 and fast.last_id == ids[30]


def test_arrow_window_stops_at_young_rows_like_the_plain_one(engine, table):
    table, source = table
    ids = insert_rows(engine, table, Sensors().normal(20), start=BASE, step_seconds=60)
    ready_before = BASE + dt.timedelta(minutes=12, seconds=30)
    plain, fast, arrow = _both(engine, source, 0, 100, ready_before=ready_before)
    assert arrow.fetches == 1
    _same(plain, fast)
    assert fast.last_id == ids[12]


def _sqlite_with_raw_value(tmp_path, rows: int, row: int, column: str, literal: str):
    """A SQLite source table of ``rows`` rows where ``column`` of row ``row`` holds
    the SQL ``literal`` (SQLite keeps any type in any column)."""
    from anomaly_monitor.db import create_engine
    from tests.helpers import source_table

    engine = create_engine(f"sqlite:///{tmp_path / 'raw.db'}")
    table = source_table(engine)
    with engine.connect() as connection:
        source = reflect_source(connection, monitor_settings())
    ids = insert_rows(engine, table, Sensors().normal(rows), start=BASE)
    with engine.begin() as connection:
        connection.execute(table.update().where(table.c.id == ids[row])
                           .values({column: sa.literal_column(literal)}))
    return engine, source, ids


def test_a_value_the_driver_cannot_type_falls_back_and_is_quarantined(tmp_path):
    engine, source, ids = _sqlite_with_raw_value(tmp_path, 5, 2, "f1", "'broken'")
    plain, fast, arrow = _both(engine, source, 0, 100)
    assert not arrow.usable  # it stands aside for a while
    _same(plain, fast)
    assert [(b.source_id, b.reason) for b in fast.bad] == [(ids[2], "non_numeric")]
    engine.dispose()


def test_integer_numeric_and_boolean_features(engine):
    metadata = sa.MetaData()
    table = sa.Table("typed", metadata, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("ts", sa.DateTime(timezone=True)),
                     sa.Column("count", sa.BigInteger), sa.Column("price", sa.Numeric(12, 3)),
                     sa.Column("open", sa.Boolean), sa.Column("ratio", sa.Float),
                     sa.Column("level", sa.REAL))  # float4 on PostgreSQL
    metadata.create_all(engine)
    values = [(3, "1.250", True, 0.5, 0.1), (None, "2.000", False, 1.5, 0.2),
              (7, None, True, 2.5, 0.3), (2**40, "-3.125", None, -0.5, 1e-7),
              (1, "4.5", False, None, 3.3)]
    with engine.begin() as connection:
        connection.execute(table.insert(), [
            {"id": i + 1, "ts": BASE + dt.timedelta(minutes=i), "count": c,
             "price": None if p is None else sa.literal(p, sa.Numeric(12, 3)).value,
             "open": o, "ratio": r, "level": v}
            for i, (c, p, o, r, v) in enumerate(values)])
    monitor = monitor_settings(table="typed",
                               features=("count", "price", "open", "ratio", "level"))
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    plain, fast, arrow = _both(engine, source, 0, 100)
    assert arrow.fetches == 1 and arrow.usable
    _same(plain, fast)
    assert fast.ids.tolist() == [1]
    assert fast.values[0].tolist() == [3.0, 1.25, 1.0, 0.5, 0.1]  # a REAL reads as 0.1
    assert sorted(b.source_id for b in fast.bad) == [2, 3, 4, 5]


def test_epoch_timestamps_and_the_young_row_cut(engine):
    metadata = sa.MetaData()
    table = sa.Table("epochs", metadata, sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("ts", sa.Numeric(16, 3)), sa.Column("x", sa.Float))
    metadata.create_all(engine)
    start = BASE.timestamp()
    with engine.begin() as connection:
        connection.execute(table.insert(), [
            {"id": i + 1, "ts": sa.literal(f"{start + 60 * i:.3f}", sa.Numeric(16, 3)).value,
             "x": float(i)} for i in range(20)])
    monitor = monitor_settings(table="epochs", features=("x",))
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    ready_before = BASE + dt.timedelta(minutes=9, seconds=30)
    plain, fast, arrow = _both(engine, source, 0, 100, ready_before=ready_before)
    assert arrow.fetches == 1 and arrow.usable
    _same(plain, fast)
    assert fast.last_id == 10 and fast.timestamp(0) == BASE


def test_a_blob_feature_is_read_by_the_plain_path(tmp_path):
    engine, source, _ = _sqlite_with_raw_value(tmp_path, 4, 1, "f2", "x'322e35'")  # b"2.5"
    plain, fast, arrow = _both(engine, source, 0, 100)
    # The driver would type the column as binary and render its REALs with 7 digits.
    assert not arrow.usable
    _same(plain, fast)
    assert fast.values[1, 2] == 2.5  # numeric bytes read as the number, as numpy does
    engine.dispose()


def test_a_page_read_ahead_long_ago_is_read_again(engine, table):
    table, source = table
    insert_rows(engine, table, Sensors().normal(30), start=BASE)
    now = [0.0]
    arrow = ArrowReader(engine, clock=lambda: now[0])
    with engine.connect() as connection:
        read_window(connection, source, 0, 10, arrow=arrow)  # full: the next is read ahead
        now[0] += 1.0
        read_window(connection, source, 10, 10, arrow=arrow)  # used; the next read ahead
        now[0] += 60.0
        window = read_window(connection, source, 20, 10, arrow=arrow)  # too old: read again
    arrow.close()
    assert (arrow.fetches, arrow.read_ahead_hits) == (3, 1)
    assert window.ids.tolist() == list(range(21, 31))


def test_run_batch_reads_a_backlog_through_arrow_one_page_ahead(engine):
    monitor = monitor_settings(batch_size=1000)
    table, monitor, source, _ = trained_plant(engine, monitor, rows=600)
    ids = insert_rows(engine, table, Sensors(seed=5).anomalous(2500))
    state, models = ReadState(), ModelCache("cpu")
    results = [run_batch(engine, monitor, source, models, read_state=state) for _ in range(4)]
    assert [r.rows for r in results] == [1000, 1000, 500, 0]
    assert state.arrow is not None and state.arrow.usable  # no read failed, not even empty
    assert [r.first_id for r in results[:3]] == [ids[0], ids[1000], ids[2000]]
    # The first window (no backlog seen yet) is read plainly; it is full, so the next
    # one is read ahead through Arrow while it is scored, and so on.
    assert state.arrow is not None
    assert (state.arrow.fetches, state.arrow.read_ahead_hits) == (2, 2)
    # After a small window the next is read plainly again; an empty one through Arrow
    # is a valid window too.
    arrow = ArrowReader(engine)
    with engine.connect() as connection:
        empty = read_window(connection, source, ids[-1], 1000, arrow=arrow)
    assert (empty.size, arrow.fetches, arrow.usable) == (0, 1, True)
    arrow.close()
    state.close()
    assert sum(r.flagged for r in results) >= 0.95 * len(ids)


def test_features_in_a_different_order_than_the_table(engine, table):
    table, _ = table
    monitor = monitor_settings(features=tuple(reversed(FEATURES)))
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    insert_rows(engine, table, Sensors().normal(8), start=BASE)
    plain, fast, arrow = _both(engine, source, 0, 100)
    assert arrow.fetches == 1
    _same(plain, fast)


def test_the_window_query_renders_only_integers_into_its_compiled_sql(engine, table):
    from anomaly_monitor.reading.query import WindowQuery

    _, source = table
    query = WindowQuery(source, source.features, 500, engine.dialect.name == "postgresql")
    compiled = query.compile(engine.dialect)
    first, second = WindowQuery.sql(compiled, 41), WindowQuery.sql(compiled, 10**15)
    assert "> 41" in first and f"> {10**15}" in second
    assert first.replace("> 41", "> X") == second.replace(f"> {10**15}", "> X")
    with pytest.raises(TypeError):
        WindowQuery.sql(compiled, "1 OR 1=1")  # type: ignore[arg-type]
    # The plain reader runs the same statement through SQLAlchemy.
    with engine.connect() as connection:
        rows = connection.execute(query.statement, query.params(0)).all()
    assert rows == []


def test_an_idle_arrow_reader_gives_its_connection_back(engine):
    from anomaly_monitor.batch import ARROW_IDLE_SECONDS

    monitor = monitor_settings(batch_size=1000)
    table, monitor, source, _ = trained_plant(engine, monitor, rows=600)
    insert_rows(engine, table, Sensors(seed=6).normal(2500))
    state, models = ReadState(), ModelCache("cpu")
    for _ in range(3):
        run_batch(engine, monitor, source, models, read_state=state)
    assert state.arrow is not None and state.arrow._backend is not None
    state.close_idle()  # just used: kept for the next catch-up
    assert state.arrow._backend is not None
    state.arrow._used_at -= ARROW_IDLE_SECONDS + 1
    state.close_idle()
    assert state.arrow._backend is None
    assert run_batch(engine, monitor, source, models, read_state=state).status == "idle"
