"""Hypothesis-generated poison rows through a real database: every row is scored or
quarantined with a reason, scores stay finite, and the cursor always advances."""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_monitor.batch import run_batch
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.reading.values import REASONS
from anomaly_monitor.registry import ModelCache
from anomaly_monitor.tables import anomalies, batches, quarantine
from tests.helpers import (
    FEATURES,
    monitor_settings,
    trained_plant,
)

NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0, 1e30]),
    st.integers(-(2**53), 2**53),
    st.none(),
)
TEXT = st.text(min_size=1, max_size=6).filter(lambda t: not _numeric(t))


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.fixture
def poisoned(engine):
    table, monitor, source, _ = trained_plant(engine, monitor_settings(batch_size=7))
    return engine, table, monitor, source, ModelCache("cpu")


def bad(value: object) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, float) and not math.isfinite(value))


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_poison_row_is_scored_or_quarantined(poisoned, data):
    engine, table, monitor, source, models = poisoned
    cell = st.one_of(NUMBERS, TEXT) if engine.dialect.name == "sqlite" else NUMBERS
    rows = data.draw(st.lists(st.tuples(*[cell] * len(FEATURES)), min_size=1, max_size=20))
    with engine.begin() as connection:
        first = connection.execute(sa.select(sa.func.max(table.c.id))).scalar()
        connection.execute(sa.text(
            f"INSERT INTO readings (ts, {', '.join(FEATURES)}) VALUES "
            f"(CURRENT_TIMESTAMP, {', '.join(':' + f for f in FEATURES)})"),
            [dict(zip(FEATURES, r, strict=True)) for r in rows])
        last = connection.execute(sa.select(sa.func.max(table.c.id))).scalar()
    while not run_batch(engine, monitor, source, models).caught_up:
        pass
    with engine.connect() as connection:
        assert read_cursor(connection, "plant").position == last
        reasons = dict(connection.execute(
            sa.select(quarantine.c.source_id, quarantine.c.reason)
            .where(quarantine.c.source_id > first)).all())
        counted = connection.execute(sa.select(sa.func.sum(batches.c.rows))
                                     .where(batches.c.first_id > first)).scalar()
        scores = connection.execute(sa.select(anomalies.c.score)
                                    .where(anomalies.c.source_id > first)).scalars().all()
    expected_bad = [first + 1 + i for i, r in enumerate(rows) if any(bad(v) for v in r)]
    assert sorted(reasons) == expected_bad
    assert set(reasons.values()) <= set(REASONS)
    assert counted == len(rows)
    assert all(math.isfinite(s) for s in scores)
