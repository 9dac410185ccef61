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
