"""A row stamped far in the future, with ``query_delay_seconds`` set: it is scored at
once (and counted, and warned about) instead of holding every later row back until
its time comes."""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.metrics import Metrics
from anomaly_monitor.worker import Worker
from tests.helpers import Sensors, insert_rows, monitor_settings, settings, trained_plant


def test_a_row_stamped_in_2099_does_not_stop_the_monitor(engine, db_url, caplog):
    sensors = Sensors(seed=3)
    table, monitor, _, _ = trained_plant(
        engine, monitor_settings(query_delay_seconds=30.0), sensors=sensors)
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    before = insert_rows(engine, table, sensors.normal(5), start=old)
    future = insert_rows(engine, table, sensors.normal(1),
                         start=dt.datetime(2099, 1, 1, tzinfo=dt.UTC))
    after = insert_rows(engine, table, sensors.normal(5), start=old + dt.timedelta(minutes=5))
    young = insert_rows(engine, table, sensors.normal(2), start=dt.datetime.now(dt.UTC))
    with caplog.at_level(logging.WARNING):
        state = worker.poll("plant")
    assert state.status == "running"
    assert state.rows == len(before + future + after)  # the young rows wait, as they should
    assert f"1 row(s) stamped over 3600 s in the future (first id {future[0]})" in caplog.text
    registry = worker.metrics.registry
    assert registry.get_sample_value("anomaly_monitor_future_rows_total",
                                     {"monitor": "plant"}) == 1
    with engine.connect() as connection:
        backlog = connection.execute(sa.select(sa.func.count()).select_from(table)
                                     .where(table.c.id > after[-1])).scalar()
    assert backlog == len(young)



def _epoch_ms_table(engine: sa.Engine) -> sa.Table:
    from tests.helpers import FEATURES

    metadata = sa.MetaData()
    table = sa.Table("readings", metadata,
                     sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                     sa.Column("ts", sa.BigInteger, nullable=False),
                     *(sa.Column(f, sa.Float) for f in FEATURES))
    metadata.create_all(engine)
    return table


def test_epoch_millisecond_timestamps_are_read_as_times(engine, db_url):
    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.tables import anomalies
    from tests.helpers import FEATURES, _fit_once

    table = _epoch_ms_table(engine)
    sensors = Sensors(seed=5)
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)

    def insert(values, start_ms: int) -> None:
        with engine.begin() as connection:
            connection.execute(table.insert(), [
                {"ts": start_ms + 1000 * i, **dict(zip(FEATURES, map(float, row), strict=True))}
                for i, row in enumerate(values)])

    insert(sensors.normal(600), now_ms - 3_600_000)
    monitor = monitor_settings(query_delay_seconds=60.0)
    with _fit_once():
        train_monitor(engine, monitor, device="cpu")
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    insert(sensors.anomalous(5), now_ms - 600_000)
    insert(sensors.normal(3), now_ms)  # younger than the delay: they wait
    state = worker.poll("plant")
    assert state.rows == 5 and state.flagged >= 1
    stamp = state.newest_timestamp
    assert stamp is not None and abs(stamp.timestamp() * 1000 - (now_ms - 596_000)) < 1
    with engine.connect() as connection:
        stamps = connection.execute(sa.select(anomalies.c.source_timestamp)).scalars().all()
    assert stamps and all(s is not None for s in stamps)
    lag = worker.metrics.registry.get_sample_value("anomaly_monitor_source_lag_seconds",
                                                   {"monitor": "plant"})
    assert 590 < lag < 900


def test_a_postgresql_view_with_a_delay_is_scored(pg_url):
    from anomaly_monitor.db import create_engine

    engine = create_engine(pg_url)
    sensors = Sensors(seed=6)
    table, _, _, _ = trained_plant(engine, monitor_settings(), sensors=sensors)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE VIEW readings_v AS SELECT * FROM readings"))
    monitor = monitor_settings(name="view", table="readings_v", query_delay_seconds=1.0)
    from anomaly_monitor.lifecycle import train_monitor
    from tests.helpers import _fit_once

    with _fit_once():
        train_monitor(engine, monitor, device="cpu")
    worker = Worker(settings(pg_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    insert_rows(engine, table, sensors.normal(20), start=old, step_seconds=1)
    state = worker.poll("view")
    assert (state.status, state.rows) == ("running", 20), state.detail
    engine.dispose()
