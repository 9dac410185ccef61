"""Window monitors with entities: train -> run_batch -> am_ tables, on SQLite and
PostgreSQL; per-entity states committed with the cursor; late rows with their own
windows."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import sqlalchemy as sa

from anomaly_monitor.batch import run_batch, sweep_late_rows
from anomaly_monitor.config import MonitorSettings, ThresholdSettings, WindowSettings
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.detectors.capacity import window_widths
from anomaly_monitor.entities import count_entities, read_states, write_states
from anomaly_monitor.lifecycle import train_monitor
from anomaly_monitor.registry import ModelCache, load_model
from anomaly_monitor.report import list_anomalies, monitor_status, move_cursor
from anomaly_monitor.source import SchemaError, reflect_source
from anomaly_monitor.tables import anomalies, entity_states
from anomaly_monitor.windows import EntityState, WindowSpec
from tests.helpers import drain

HOSTS = ("a", "b", "c")
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def host_table(engine: sa.Engine) -> sa.Table:
    metadata = sa.MetaData()
    table = sa.Table("metrics", metadata,
                     sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
                     sa.Column("host", sa.String(20)),
                     sa.Column("cpu", sa.Float), sa.Column("mem", sa.Float))
    metadata.create_all(engine)
    return table


def host_rows(first_id: int, steps: int, hosts=HOSTS, seed: int = 0, *, shift_host=None,
              shift_from: int | None = None) -> list[dict]:
    """One sample per host per step; host i runs at 10 * (i + 1) with a daily cycle."""
    rng = np.random.default_rng(seed)
    rows, next_id = [], first_id
    for step in range(steps):
        for i, host in enumerate(hosts):
            level = 10.0 * (i + 1)
            cpu = level + 0.3 * level * np.sin(2 * np.pi * (first_id + step) / 96) + rng.normal()
            if host == shift_host and shift_from is not None and step >= shift_from:
                cpu += 8 * level
            rows.append({"id": next_id, "ts": START + dt.timedelta(minutes=5 * next_id),
                         "host": host, "cpu": float(cpu),
                         "mem": float(50 + i + rng.normal(0, 0.5))})
            next_id += 1
    return rows


def window_monitor(**overrides) -> MonitorSettings:
    base = {"name": "hosts", "table": "metrics", "timestamp_column": "ts",
            "features": ("cpu", "mem"), "entity_column": "host", "kind": "dae",
            "batch_size": 97, "window": WindowSettings(size=4, derived=("diff", "spread"),
                                                       baseline_half_life=200.0),
            "threshold": ThresholdSettings(method="robust", target_fpr=0.01),
            "model": {"epochs": 5, "n_estimators": 1, "random_state": 0}}
    base.update(overrides)
    return MonitorSettings(**base)


def train_hosts(engine) -> tuple[sa.Table, MonitorSettings, object, int]:
    """The hosts table with 300 steps of history, a window monitor trained on it and its
    cursor after the history: (table, monitor, train report, last history id)."""
    table = host_table(engine)
    history = host_rows(1, 300)
    with engine.begin() as connection:
        connection.execute(table.insert(), history)
    monitor = window_monitor()
    report = train_monitor(engine, monitor, device="cpu")
    with engine.begin() as connection:  # score what comes after the training rows
        move_cursor(connection, monitor, len(history), force=True)
    return table, monitor, report, len(history)


@pytest.fixture
def trained(engine):
    table, monitor, report, last = train_hosts(engine)
    with engine.connect() as connection:
        states = read_states(connection, "hosts", 1, HOSTS,
                             load_model(connection, "hosts", 1).window)
    return engine, table, monitor, report, last, states


def flags(engine):
    with engine.connect() as connection:
        return connection.execute(
            sa.select(anomalies.c.source_id, anomalies.c.entity, anomalies.c.score)
            .order_by(anomalies.c.source_id)).all()


def test_training_stores_a_baseline_per_entity(trained):
    engine, _, _, report, _, states = trained
    version = report.version
    assert version.features == ["cpu", "mem"]
    assert version.training["window"]["size"] == 4 and version.training["entities"] == 3
    assert version.threshold == pytest.approx(2.0)  # each entity's 1% tail
    n_inputs = len(WindowSpec.from_dict(version.training["window"]).input_names())
    assert tuple(version.training["architecture"]["hidden_dims"]) == window_widths(n_inputs)
    assert sorted(states) == list(HOSTS) and all(s.samples == 300 for s in states.values())
    # each host's own level
    assert [round(states[h].mean[0] / 10) for h in HOSTS] == [1, 2, 3]
    with engine.connect() as connection:
        model = load_model(connection, "hosts", 1)
        assert model.detector.feature_names_in_[:5] == [
            "cpu[t-4]", "cpu[t-3]", "cpu[t-2]", "cpu[t-1]", "cpu[t]"]


def test_scores_do_not_depend_on_batch_boundaries(trained, tmp_path):
    """The same rows after the same states score the same, whatever the batch size;
    the entities' states are committed with each batch."""
    engine, table, monitor, _, last, trained_states = trained
    new = host_rows(last + 1, 200, seed=1, shift_host="b", shift_from=100)
    with engine.begin() as connection:
        connection.execute(table.insert(), new)
    drain(engine, monitor)
    first = flags(engine)
    with engine.connect() as connection:
        after = {r.entity: bytes(r.state) for r in connection.execute(
            sa.select(entity_states.c.entity, entity_states.c.state))}
    # Again from the same start and the same states, in batches of another size.
    with engine.begin() as connection:
        connection.execute(anomalies.delete())
        write_states(connection, "hosts", 1, trained_states, START)
        move_cursor(connection, monitor, last, force=True)
    drain(engine, window_monitor(batch_size=1000))
    second = flags(engine)
    assert [(r.source_id, r.entity) for r in first] == [(r.source_id, r.entity) for r in second]
    np.testing.assert_allclose([r.score for r in first], [r.score for r in second], rtol=1e-9)
    with engine.connect() as connection:
        again = {r.entity: bytes(r.state) for r in connection.execute(
            sa.select(entity_states.c.entity, entity_states.c.state))}
    assert again.keys() == after.keys()
    for key in after:  # equal up to the last bits of float rounding
        np.testing.assert_allclose(np.frombuffer(again[key]), np.frombuffer(after[key]),
                                   rtol=1e-12, atol=1e-12)
    # the level shift of host b is flagged at its start, and the flags name host b
    shift_start = last + 100 * len(HOSTS) + 2
    assert any(r.entity == "b" and shift_start <= r.source_id < shift_start + 30 for r in first)


def test_a_value_normal_for_its_host_is_not_flagged(trained):
    """cpu 30 is host c's normal and 3 times host a's."""
    engine, table, monitor, _, last, _ = trained
    rows = host_rows(last + 1, 40, seed=2)
    for row in rows:
        if row["host"] == "a" and row["id"] > last + 60:
            row["cpu"] = 30.0 + (row["id"] % 3)
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    drain(engine, monitor)
    found = flags(engine)
    assert any(r.entity == "a" for r in found)
    c_rows = {r["id"] for r in rows if r["host"] == "c"}
    assert sum(r.source_id in c_rows for r in found) <= 2
    with engine.connect() as connection:
        listed = list_anomalies(connection, "hosts", entity="a", limit=1000)
        status = monitor_status(connection, monitor)
    assert listed and all(r["entity"] == "a" for r in listed)
    assert status["entities"] == 3
    # the explanation names the feature and the lag
    assert all("[t" in c["feature"] for r in listed for c in r["top_features"])


def test_a_new_entity_is_learned_and_counted(trained):
    engine, table, monitor, _, last, _ = trained
    rows = host_rows(last + 1, 120, hosts=(*HOSTS, "d"), seed=3)
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    results = drain(engine, monitor)
    assert sum(r.new_entities for r in results) == 1
    learning = sum(r.learning_rows for r in results)
    # its first 10 samples form its baseline, then 50 samples' weight its calibration
    assert 60 <= learning <= 70
    with engine.connect() as connection:
        assert count_entities(connection, "hosts", 1) == 4
        cursor = read_cursor(connection, "hosts")
    assert cursor.position == rows[-1]["id"]
    d_ids = {r["id"] for r in rows if r["host"] == "d"}
    first_d = sorted(d_ids)[:learning]
    assert not any(r.source_id in first_d for r in flags(engine))  # learning: never flagged


def test_a_row_with_a_null_entity_is_its_own_entity(trained):
    engine, table, monitor, _, last, _ = trained
    rows = host_rows(last + 1, 20, seed=4)
    for row in rows[:10]:
        row["host"] = None
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    drain(engine, monitor)
    with engine.connect() as connection:
        keys = set(connection.execute(sa.select(entity_states.c.entity)).scalars())
    assert "" in keys


def test_a_late_row_is_scored_with_its_own_window_and_leaves_states_alone(engine):
    """A row that commits below the cursor (into a gap) is scored by the sweep with the
    samples of its entity before it; the entities' states do not move."""
    table = host_table(engine)
    history = host_rows(1, 300)
    with engine.begin() as connection:
        connection.execute(table.insert(), history)
    monitor = window_monitor()
    train_monitor(engine, monitor, device="cpu")
    rows = host_rows(len(history) + 1, 60, seed=5)
    late = rows.pop(30)
    late["cpu"] = 500.0  # far off for its host: flagged
    with engine.begin() as connection:
        move_cursor(connection, monitor, len(history), force=True)
        connection.execute(table.insert(), rows)
    drain(engine, monitor)
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
        before = {r.entity: bytes(r.state) for r in connection.execute(
            sa.select(entity_states.c.entity, entity_states.c.state))}
    with engine.begin() as connection:
        connection.execute(table.insert(), [late])
    result = sweep_late_rows(engine, monitor, source, ModelCache("cpu"))
    assert result is not None and result.scored == 1 and result.flagged == 1
    with engine.connect() as connection:
        after = {r.entity: bytes(r.state) for r in connection.execute(
            sa.select(entity_states.c.entity, entity_states.c.state))}
        row = connection.execute(sa.select(anomalies).where(
            anomalies.c.source_id == late["id"])).one()
    assert after == before
    assert row.entity == late["host"]
    assert EntityState  # states are what windows.EntityState packs


def test_a_config_that_no_longer_matches_the_version_is_refused(trained):
    """A version trained as a window monitor does not score for a config that became a
    row monitor or changed its window: the worker pauses it, naming train."""
    engine, table, _, _, last, _ = trained
    with engine.begin() as connection:
        connection.execute(table.insert(), host_rows(last + 1, 5))
    for changed in (window_monitor(window=None, entity_column=None),
                    window_monitor(window=WindowSettings(size=8))):
        with engine.connect() as connection:
            source = reflect_source(connection, changed)
        with pytest.raises(SchemaError, match="retrain with: anomaly-monitor train hosts"):
            run_batch(engine, changed, source, ModelCache("cpu"))


def test_rows_the_states_learned_already_do_not_move_them_again(trained):
    """After the cursor is moved back, rows at or below each entity's last learned id
    are scored with their own window (read from the table) and leave the states alone;
    the states' position is the last id they learned."""
    engine, table, monitor, _, last, _ = trained
    rows = host_rows(last + 1, 60, seed=6)
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    drain(engine, monitor)

    def states():
        with engine.connect() as connection:
            return {r.entity: (bytes(r.state), r.last_id) for r in connection.execute(
                sa.select(entity_states.c.entity, entity_states.c.state,
                          entity_states.c.last_id))}

    learned = states()
    assert {key: position for key, (_, position) in learned.items()} == {
        host: max(r["id"] for r in rows if r["host"] == host) for host in HOSTS}
    with engine.begin() as connection:
        move_cursor(connection, monitor, last, force=True)
    results = drain(engine, monitor)
    assert sum(r.scored for r in results) == len(rows)
    assert states() == learned
    with engine.begin() as connection:  # new rows after that move the states on
        connection.execute(table.insert(), host_rows(rows[-1]["id"] + 1, 5, seed=7))
    drain(engine, monitor)
    assert all(states()[h][1] > learned[h][1] for h in HOSTS)
