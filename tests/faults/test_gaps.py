"""Id gaps: every gap a batch leaves is recorded, swept and eventually closed."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor import batch
from anomaly_monitor.batch import run_batch, sweep_late_rows
from anomaly_monitor.db import create_engine
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import ModelCache
from anomaly_monitor.scoring import gap_ranges, subtract_ids
from anomaly_monitor.tables import batches
from anomaly_monitor.worker import Worker
from tests.helpers import (
    FEATURES,
    monitor_settings,
    settings,
    trained_plant,
)


def test_gap_arithmetic():
    assert gap_ranges([3, 4, 7], 0, 9) == [[1, 2], [5, 6], [8, 9]]
    assert gap_ranges([], 5, 7) == [[6, 7]] and gap_ranges([1, 2, 3], 0, 3) == []
    assert subtract_ids([[1, 5], [8, 8]], [2, 8]) == [[1, 1], [3, 5]]


def rows(ids, value=0.1):
    now = dt.datetime.now(dt.UTC)
    return [{"id": i, "ts": now, **{f: value for f in FEATURES}} for i in ids]


@pytest.fixture
def sparse(engine):
    table, monitor, source, _ = trained_plant(engine, monitor_settings(batch_size=5000))
    return engine, table, monitor, source


def test_a_window_ends_before_a_gap_it_could_not_record(sparse):
    engine, table, monitor, source = sparse
    ids = list(range(1000, 1000 + 2 * 2500, 2))  # every other id: 2500 holes
    with engine.begin() as connection:
        connection.execute(table.insert(), rows(ids))
    models = ModelCache("cpu")
    first = run_batch(engine, monitor, source, models)
    assert not first.caught_up and first.rows == 1000  # the first gap is 601..999
    while not run_batch(engine, monitor, source, models).caught_up:
        pass
    with engine.connect() as connection:
        spans = connection.execute(sa.select(batches.c.rows, batches.c.gaps)).all()
    assert sum(s.rows for s in spans) == 2500
    assert max(len(s.gaps) for s in spans) <= batch.MAX_GAP_RANGES
    # Fill every hole: the sweep reads them all (in chunks: fine on SQLite too).
    with engine.begin() as connection:
        connection.execute(table.insert(), rows(range(1001, 1000 + 2 * 2500, 2)))
    late = sweep_late_rows(engine, monitor, source, models)
    assert late is not None and late.rows == 2499
    with engine.connect() as connection:
        still_open = connection.execute(sa.select(sa.func.count()).select_from(batches)
                                        .where(batches.c.open_gaps.is_not(None))).scalar()
    assert still_open == 1  # the hole between the training rows and id 1000 stays empty
    assert sweep_late_rows(engine, monitor, source, models) is None


def test_old_gaps_are_closed_after_a_last_look(sparse, monkeypatch):
    engine, table, monitor, source = sparse
    with engine.begin() as connection:
        connection.execute(table.insert(), rows([2000, 2002]))
    models = ModelCache("cpu")
    run_batch(engine, monitor, source, models)
    with engine.begin() as connection:
        connection.execute(table.insert(), rows([2001]))
    monkeypatch.setattr(batch, "GAP_RETENTION_SECONDS", 0.0)
    late = sweep_late_rows(engine, monitor, source, models)
    assert late is not None and late.rows == 1  # found in the last look...
    with engine.connect() as connection:  # ...and every gap closed afterwards
        assert connection.execute(sa.select(sa.func.count()).select_from(batches)
                                  .where(batches.c.open_gaps.is_not(None))).scalar() == 0


def test_a_long_open_transaction_is_read_past_once_and_its_rows_swept(pg_url, monkeypatch):
    monkeypatch.setattr(batch, "HORIZON_MAX_STALL_SECONDS", 0.3)
    engine = create_engine(pg_url)
    table, monitor, _, _ = trained_plant(engine)
    registry = CollectorRegistry()
    worker = Worker(settings(pg_url, monitor), engine, Metrics(registry), device="cpu")
    long = engine.connect()
    long_tx = long.begin()
    long.execute(table.insert().values(ts=dt.datetime.now(dt.UTC), **{f: 0.1 for f in FEATURES}))
    with engine.begin() as connection:
        connection.execute(table.insert(), [{k: v for k, v in r.items() if k != "id"}
                                            for r in rows(range(3))])
    assert worker.poll("plant").rows == 0  # held back behind the open transaction
    time.sleep(0.4)
    assert worker.poll("plant").rows == 3  # the same blocker for too long: read past it
    with engine.begin() as connection:
        connection.execute(table.insert(), [{k: v for k, v in r.items() if k != "id"}
                                            for r in rows(range(2))])
    assert worker.poll("plant").rows == 5  # and no new wait while it stays open
    long_tx.commit()
    long.close()
    worker.poll("plant")
    assert registry.get_sample_value("anomaly_monitor_late_rows_total",
                                     {"monitor": "plant"}) == 1
    assert worker.states["plant"].rows == 6
    engine.dispose()


def test_old_batches_are_swept_at_doubling_ages_not_every_poll():
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def due(since_age: float, age: float) -> bool:
        return batch.sweep_due(start, start + dt.timedelta(seconds=since_age),
                               start + dt.timedelta(seconds=age))

    assert batch.sweep_due(start, None, start + dt.timedelta(seconds=500))
    assert due(10, 20) and due(58, 59)  # young: every sweep
    assert due(119, 121) and due(239, 241) and due(1900, 1921)  # 120, 240, ..., 1920 s
    assert not due(125, 200) and not due(2000, 3000)
    assert due(3500, 3600) and due(4000, 4005)  # the last look, and expired ones
    # About 6 reads of an old batch over the hour, where a 1 s interval made 3,540.
    reads = sum(due(t - 1, t) for t in range(61, 3601))
    assert reads == 6


def test_ids_that_step_by_ten_are_all_scored_once_and_swept_cheaply(sparse):
    engine, table, monitor, source = sparse
    ids = list(range(10_000, 10_000 + 10 * 3000, 10))  # a sequence shared with others
    with engine.begin() as connection:
        connection.execute(table.insert(), rows(ids))
    models, state = ModelCache("cpu"), batch.ReadState()
    first = run_batch(engine, monitor, source, models, read_state=state)
    assert first.rows <= batch.MAX_GAP_RANGES + 1 and not first.caught_up
    # The next window reads about twice what this one kept, not the whole batch size.
    assert state.limit(monitor.batch_size) == 2048 < monitor.batch_size
    while not run_batch(engine, monitor, source, models, read_state=state).caught_up:
        pass
    state.close()
    with engine.connect() as connection:
        scored = connection.execute(sa.select(sa.func.sum(batches.c.rows))).scalar()
        n_batches = connection.execute(sa.select(sa.func.count()).select_from(batches)).scalar()
    assert scored == 3000  # every row once
    # Age every batch past the eager minute: a sweep between checkpoints reads nothing.
    with engine.begin() as connection:
        connection.execute(batches.update().values(
            started_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=300)))
    statements = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda *args: statements.append(args[2]))
    now = dt.datetime.now(dt.UTC)
    since = now - dt.timedelta(seconds=5)
    assert sweep_late_rows(engine, monitor, source, models, since=since,
                           clock=lambda: now) is None
    reads = [s for s in statements if "FROM readings" in s]
    assert reads == []  # no batch due: not one read of the table
    # A row committed late into an old gap is found at the next checkpoint (480 s).
    with engine.begin() as connection:
        connection.execute(table.insert(), rows([ids[100] + 5]))
    later = now + dt.timedelta(seconds=185)
    late = sweep_late_rows(engine, monitor, source, models, since=now, clock=lambda: later)
    assert late is not None and late.rows == 1
    assert n_batches >= 3
