"""Rows whose transactions commit out of id order are scored, never skipped (PostgreSQL)."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.batch import run_batch, sweep_late_rows
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.db import create_engine
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.reading.horizon import committed_before
from anomaly_monitor.registry import ModelCache
from anomaly_monitor.tables import batches
from anomaly_monitor.worker import Worker
from tests.helpers import (
    FEATURES,
    settings,
    trained_plant,
)


@pytest.fixture
def pg_plant(pg_url):
    engine = create_engine(pg_url)
    table, monitor, source, _ = trained_plant(engine)
    yield engine, table, monitor, source
    engine.dispose()


def row(value: float = 0.1) -> dict:
    return {"ts": dt.datetime.now(dt.UTC), **{f: value for f in FEATURES}}


def test_the_window_stops_below_an_open_transaction(pg_plant):
    engine, table, monitor, source = pg_plant
    models = ModelCache("cpu")
    slow = engine.connect()
    slow_tx = slow.begin()
    early = slow.execute(table.insert().values(**row()).returning(table.c.id)).scalar()
    with engine.begin() as fast:
        late = fast.execute(table.insert().values(**row()).returning(table.c.id)).scalar()
    assert early < late
    result = run_batch(engine, monitor, source, models)
    assert result.status == "idle"  # the committed row waits behind the open one
    with engine.connect() as connection:
        assert read_cursor(connection, "plant").position < early
    slow_tx.commit()
    slow.close()
    result = run_batch(engine, monitor, source, models)
    assert (result.first_id, result.last_id, result.rows) == (early, late, 2)


def test_a_row_committed_behind_the_cursor_is_swept_and_counted(pg_plant, pg_url):
    engine, table, monitor, source = pg_plant
    # The residual race: an id taken before the transaction writes anything (so it
    # has no transaction id yet), then committed after later rows were scored.
    slow = engine.connect()
    slow_tx = slow.begin()
    sequence = sa.text("SELECT nextval(pg_get_serial_sequence('readings', 'id'))")
    early = int(slow.execute(sequence).scalar())
    with engine.begin() as fast:
        fast.execute(table.insert(), [row(), row()])
    registry = CollectorRegistry()
    worker = Worker(settings(pg_url, monitor), engine, Metrics(registry), device="cpu")
    worker.poll("plant")
    with engine.connect() as connection:
        assert read_cursor(connection, "plant").position > early
    slow.execute(table.insert().values(id=early, **row(5.0)))
    slow_tx.commit()
    slow.close()
    worker.poll("plant")
    assert registry.get_sample_value("anomaly_monitor_late_rows_total", {"monitor": "plant"}) == 1
    with engine.connect() as connection:
        kinds = dict(connection.execute(sa.select(batches.c.kind, sa.func.sum(batches.c.rows))
                                        .group_by(batches.c.kind)).all())
        gaps = [g for (g,) in connection.execute(sa.select(batches.c.open_gaps)) if g]
    assert kinds == {"window": 2, "late": 1} and gaps == []
    assert sweep_late_rows(engine, monitor, source, ModelCache("cpu")) is None


def test_transaction_id_wraparound_comparison():
    assert committed_before(100, 101) and not committed_before(101, 101)
    assert not committed_before(102, 101)
    assert committed_before(2**32 - 5, 2**32 + 10)  # the epoch rolled over
    assert committed_before(2, 5_000_000_000)  # frozen
