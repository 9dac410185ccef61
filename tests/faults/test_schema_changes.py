"""A feature column changed to TEXT under a running worker: it pauses, as a freshly
started worker does, instead of scoring numeric text as if nothing had happened."""

from __future__ import annotations

import time

import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.metrics import Metrics
from anomaly_monitor.runner import REFLECT_SECONDS, Clock
from anomaly_monitor.worker import Worker
from tests.helpers import FEATURES, Sensors, insert_rows, monitor_settings, settings, trained_plant


def _make_f1_text(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text("ALTER TABLE readings ALTER COLUMN f1 TYPE TEXT"))
            return
        # SQLite cannot change a column's type: rebuild the table with the same ids.
        columns = ", ".join(f"{f} {'TEXT' if f == 'f1' else 'REAL'}" for f in FEATURES)
        connection.execute(sa.text(f"CREATE TABLE readings_new (id INTEGER PRIMARY KEY, "
                                   f"ts TIMESTAMP NOT NULL, {columns}, "
                                   "label INTEGER NOT NULL DEFAULT 0, note VARCHAR(20))"))
        connection.execute(sa.text("INSERT INTO readings_new SELECT * FROM readings"))
        connection.execute(sa.text("DROP TABLE readings"))
        connection.execute(sa.text("ALTER TABLE readings_new RENAME TO readings"))


def test_a_column_changed_to_text_pauses_the_running_worker_too(engine, db_url):
    sensors = Sensors(seed=11)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(), sensors=sensors)
    now = [time.monotonic()]
    clock = Clock(monotonic=lambda: now[0])
    running = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                     device="cpu", clock=clock)
    insert_rows(engine, table, sensors.normal(5))
    assert running.poll("plant").status == "running"
    _make_f1_text(engine)
    now[0] += REFLECT_SECONDS + 1
    insert_rows(engine, sa.Table("readings", sa.MetaData(), autoload_with=engine),
                sensors.normal(5))
    state = running.poll("plant")
    assert state.status == "paused" and "not a numeric type" in state.detail
    running.release_leases()
    fresh = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                   device="cpu")
    fresh_state = fresh.poll("plant")
    assert fresh_state.status == "paused" and fresh_state.detail == state.detail
