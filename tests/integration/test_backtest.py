"""``backtest`` on SQLite and PostgreSQL: its flags equal what ``run`` flags on the same
rows with the same version (row and window monitors, the active version and a
candidate), suppression and feedback apply, and it writes nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import sqlalchemy as sa

from anomaly_monitor.backtest import flag_rate, rows_to_read, run_backtest
from anomaly_monitor.feedback import label
from anomaly_monitor.lifecycle import train_monitor
from anomaly_monitor.registry import activate
from anomaly_monitor.report import move_cursor
from anomaly_monitor.suppression import add_window
from anomaly_monitor.tables import anomalies, batches, cursors, entity_states, incidents
from tests.helpers import (
    Sensors,
    bulk_insert,
    drain,
    monitor_settings,
    source_table,
    trained_plant,
)
from tests.integration.test_incidents import _episodes

FAR = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


def _stored(engine, generation=0) -> dict[int, tuple[float, float]]:
    with engine.connect() as connection:
        return {r.source_id: (r.score, r.severity) for r in connection.execute(
            sa.select(anomalies.c.source_id, anomalies.c.score, anomalies.c.severity)
            .where(anomalies.c.generation == generation))}


def _replayed(run) -> dict[int, tuple[float, float]]:
    return {f["source_id"]: (f["score"], f["severity"]) for f in run.flags}


def _same(replayed: dict, stored: dict) -> None:
    """The same rows flagged, with the same scores up to float32 rounding (the matrix
    kernels' rounding depends on how many rows are scored together, and where)."""
    assert sorted(replayed) == sorted(stored)
    for key, (score, severity) in stored.items():
        assert replayed[key] == pytest.approx((score, severity), rel=1e-5), key


def _snapshot(engine) -> list:
    with engine.connect() as connection:
        return [connection.execute(sa.select(t)).all()
                for t in (anomalies, incidents, batches, cursors, entity_states)]


def _plant(engine):
    """History ending two hours ago, a model trained on it, and 85 new rows since
    (two anomalous runs, ``_episodes``)."""
    table = source_table(engine)
    bulk_insert(engine, table, Sensors().normal(600),
                start=dt.datetime.now(dt.UTC) - dt.timedelta(hours=12))
    monitor = monitor_settings()
    report = train_monitor(engine, monitor, device="cpu")
    return table, monitor, report, *_episodes(engine, table)


def test_a_backtest_flags_what_run_flagged_and_writes_nothing(engine):
    table, monitor, report, first_run, second_run = _plant(engine)
    drain(engine, monitor)
    with engine.connect() as connection:
        start = connection.execute(sa.select(sa.func.min(table.c.ts))
                                   .where(table.c.id > report.version.training["last_id"])
                                   ).scalar().replace(tzinfo=dt.UTC)
    before = _snapshot(engine)
    threshold = report.version.threshold
    result = run_backtest(engine, monitor, since=start, until=FAR,
                          thresholds=[threshold, threshold * 2])
    assert _snapshot(engine) == before
    mine, doubled = result.runs
    stored = _stored(engine)
    _same(_replayed(mine), stored)
    assert set(_replayed(doubled)) <= set(stored) and len(doubled.flags) < len(mine.flags)
    assert result.rows == 85 == rows_to_read(engine, monitor, since=start, until=FAR)
    with engine.connect() as connection:
        assert mine.incidents == connection.execute(
            sa.select(sa.func.count()).select_from(incidents)).scalar()
    assert sum(d["flags"] for d in mine.per_day.values()) == len(mine.flags)
    assert sum(d["rows"] for d in mine.per_day.values()) == result.rows
    assert sum(mine.severity_bands().values()) == len(mine.flags)
    assert flag_rate(result, mine) == len(mine.flags) / 85
    assert result.calibrated_rate == report.version.validation["holdout_flag_rate"]
    assert result.scores.size == result.times.size == 85
    # Feedback gives precision and recall; a suppression window marks flags.
    with engine.begin() as connection:
        label(connection, "plant", first_run + second_run, "tp", author="ana")
        others = sorted(set(stored) - set(first_run) - set(second_run))
        if others:
            label(connection, "plant", others, "fp", author="ana")
        lo = min(f["source_timestamp"] for f in mine.flags if f["source_id"] in second_run)
        add_window(connection, "plant", lo - dt.timedelta(minutes=5),
                   lo + dt.timedelta(minutes=10), author="ana")
    again = run_backtest(engine, monitor, since=start, until=FAR)
    (run,) = again.runs
    assert again.labels_from == "feedback"
    assert run.recall == 1.0 and run.precision == 15 / len(stored)
    assert {f["source_id"] for f in run.flags if f["suppressed_by"]} >= set(second_run)
    assert run.incidents == mine.incidents - 1


def test_a_candidate_backtested_before_activation_flags_what_it_then_flags(engine):
    table, monitor, report, _, _ = _plant(engine)
    first = report.version.training["last_id"] + 1
    candidate = train_monitor(engine, dataclasses.replace(monitor, model={
        **monitor.model, "random_state": 7}), device="cpu", activate_version=False,
        until=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=90))
    assert candidate.version.training["last_id"] == report.version.training["last_id"]
    with engine.connect() as connection:
        start = connection.execute(sa.select(table.c.ts).where(table.c.id == first)
                                   ).scalar().replace(tzinfo=dt.UTC)
    replay = run_backtest(engine, monitor, since=start, until=FAR,
                          version=candidate.version.version)
    # Not activated beside an active version: a challenger in shadow.
    assert replay.status == "shadow" and replay.version == candidate.version.version
    with engine.begin() as connection:
        activate(connection, "plant", candidate.version.version, initial_position=lambda: 0)
        move_cursor(connection, monitor, first - 1, force=True)
    drain(engine, monitor)
    with engine.connect() as connection:
        generation = connection.execute(sa.select(cursors.c.generation)).scalar()
    _same(_replayed(replay.runs[0]), _stored(engine, generation))


def test_a_window_monitor_replays_from_its_trained_states(engine):
    from tests.integration.test_window_monitor import host_rows, train_hosts

    table, monitor, _, last = train_hosts(engine)
    rows = host_rows(last + 1, 200, seed=1, shift_host="b", shift_from=100)
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    drain(engine, monitor)
    stored = _stored(engine)
    assert stored
    everything = run_backtest(engine, monitor, since=rows[0]["ts"], until=FAR)
    _same(_replayed(everything.runs[0]), stored)
    # A later part of the range: the rows before it move the states but are not reported.
    later = rows[300]["ts"]
    part = run_backtest(engine, monitor, since=later, until=FAR)
    _same(_replayed(part.runs[0]), {i: v for i, v in stored.items() if i >= rows[300]["id"]})
    assert part.rows == len(rows) - 300


def test_bad_ranges_and_versions_are_refused(engine):
    _, monitor, _, _ = trained_plant(engine)
    with pytest.raises(ValueError, match="must be after --since"):
        run_backtest(engine, monitor, since=FAR, until=FAR)
    from anomaly_monitor.registry import UnknownVersionError

    with pytest.raises(UnknownVersionError):
        run_backtest(engine, monitor, since=FAR - dt.timedelta(days=1), until=FAR, version=9)
