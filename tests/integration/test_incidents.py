"""Incidents: flags that follow each other grouped in the batch transaction, on SQLite
and PostgreSQL, across batches, for row and window monitors; the metrics of a poll."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.config import IncidentSettings
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.incidents import GAP_INTERVALS, incident_gap
from anomaly_monitor.lifecycle import train_monitor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.report import list_incidents, move_cursor
from anomaly_monitor.tables import anomalies, incidents
from anomaly_monitor.worker import Worker
from tests.helpers import (
    Sensors,
    drain,
    incident_errors,
    insert_rows,
    monitor_settings,
    settings,
    trained_plant,
)
from tests.integration.test_window_monitor import HOSTS, host_rows, train_hosts


def _episodes(engine, table):
    """Normal rows with two anomalous runs (10 and 5 rows), one a minute, ending now
    (rows stamped over an hour ahead would not move the horizon); returns the ids of
    the two runs."""
    sensors = Sensors(seed=5)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=85)
    parts = [sensors.normal(30), sensors.anomalous(10), sensors.normal(30),
             sensors.anomalous(5), sensors.normal(10)]
    ids = insert_rows(engine, table, np.vstack(parts), start=start, step_seconds=60.0)
    return ids[30:40], ids[70:75]


def test_a_run_of_flags_is_one_incident_across_batches(engine):
    table, monitor, _, report = trained_plant(engine, monitor_settings(batch_size=7))
    assert report.version.training["sample_interval_seconds"] == pytest.approx(60.0, rel=0.01)
    assert incident_gap(monitor, report.version) == pytest.approx(GAP_INTERVALS * 60.0, rel=0.01)
    first_run, second_run = _episodes(engine, table)
    results = drain(engine, monitor)
    assert len(results) > 10  # the runs span several batches
    gap = incident_gap(monitor, report.version)
    assert incident_errors(engine, "plant", gap) == []
    with engine.connect() as connection:
        found = list_incidents(connection, "plant", limit=100)
        by_flag = dict(connection.execute(
            sa.select(anomalies.c.source_id, anomalies.c.incident_id)).all())
    assert all(i in by_flag for i in first_run + second_run)  # every anomalous row flagged
    one, two = by_flag[first_run[0]], by_flag[second_run[0]]
    assert {by_flag[i] for i in first_run} == {one} and {by_flag[i] for i in second_run} == {two}
    incident = next(r for r in found if r["id"] == one)
    assert incident["rows"] >= 10 and incident["first_source_id"] <= first_run[0]
    assert incident["state"] == "closed" and incident["entity"] is None
    assert incident["top_features"] and 0 < incident["max_severity"] <= 100
    assert sum(r.incidents_opened for r in results) == len(found)
    assert len(found) < len(by_flag)


def test_incidents_close_when_the_stream_moves_past_them(engine):
    table, monitor, _, report = trained_plant(engine)
    sensors = Sensors(seed=9)
    with engine.connect() as connection:
        last = connection.execute(sa.select(sa.func.max(table.c.ts))).scalar()
    start = last.replace(tzinfo=dt.UTC) + dt.timedelta(minutes=1)
    insert_rows(engine, table, sensors.anomalous(3), start=start)
    drain(engine, monitor)
    with engine.connect() as connection:
        assert [r["state"] for r in list_incidents(connection, "plant")] == ["open"]
    # Two minutes later: still within the gap (three minutes); then five minutes later.
    insert_rows(engine, table, sensors.normal(1), start=start + dt.timedelta(minutes=4))
    drain(engine, monitor)
    with engine.connect() as connection:
        assert [r["state"] for r in list_incidents(connection, "plant")] == ["open"]
    insert_rows(engine, table, sensors.normal(1), start=start + dt.timedelta(minutes=9))
    drain(engine, monitor)
    with engine.connect() as connection:
        (row,) = list_incidents(connection, "plant")
        assert row["state"] == "closed" and row["closed_at"] is not None
        assert list_incidents(connection, "plant", only_open=True) == []
    assert incident_errors(engine, "plant", incident_gap(monitor, report.version)) == []


def test_a_configured_gap_and_a_cursor_reset(engine):
    """``gap_seconds`` replaces the default; a new generation starts new incidents and
    closes the old ones."""
    monitor = monitor_settings(incidents=IncidentSettings(gap_seconds=30.0))
    table, monitor, _, report = trained_plant(engine, monitor)
    assert incident_gap(monitor, report.version) == 30.0
    first_run, _ = _episodes(engine, table)
    drain(engine, monitor)
    # A gap shorter than the rows' spacing: every flag its own incident.
    with engine.connect() as connection:
        flagged = connection.execute(sa.select(sa.func.count()).select_from(anomalies)).scalar()
        assert len(list_incidents(connection, "plant", limit=1000)) == flagged
    assert incident_errors(engine, "plant", 30.0) == []
    with engine.begin() as connection:
        position = read_cursor(connection, "plant").position
        move_cursor(connection, monitor, first_run[0] - 1, force=True)  # back: a reset
    drain(engine, monitor)
    with engine.connect() as connection:
        generations = connection.execute(
            sa.select(incidents.c.generation, incidents.c.state)).all()
        assert read_cursor(connection, "plant").position == position
    assert {g for g, _ in generations} == {0, 1}
    assert all(state == "closed" for g, state in generations if g == 0)


def test_each_entity_has_its_own_incidents(engine):
    table, monitor, report, last = train_hosts(engine)
    # Each host samples every 15 minutes (three hosts, a row every 5 minutes).
    assert report.version.training["sample_interval_seconds"] == pytest.approx(900, rel=0.01)
    with engine.begin() as connection:
        connection.execute(table.insert(), host_rows(last + 1, 200, seed=1,
                                                     shift_host="b", shift_from=100))
    drain(engine, monitor)
    gap = incident_gap(monitor, report.version)
    assert incident_errors(engine, "hosts", gap) == []
    with engine.connect() as connection:
        rows = list_incidents(connection, "hosts", limit=1000)
        flags_b = connection.execute(sa.select(sa.func.count()).select_from(anomalies)
                                     .where(anomalies.c.entity == "b")).scalar()
        only_b = list_incidents(connection, "hosts", entity="b", limit=1000)
    assert {r["entity"] for r in rows} <= set(HOSTS)
    assert only_b and {r["entity"] for r in only_b} == {"b"}
    # the shift of b: its flags are fewer incidents than flags, the first at the shift
    shift_start = last + 100 * len(HOSTS) + 2
    first = min(only_b, key=lambda r: abs(r["first_source_id"] - shift_start))
    assert abs(first["first_source_id"] - shift_start) < 30 * len(HOSTS)
    assert len(only_b) < flags_b


def test_a_poll_exports_the_open_incidents_for_the_alert(db_url, engine):
    monitor = monitor_settings(incidents=IncidentSettings(alert_severity=0.0))
    table, monitor, _, _ = trained_plant(engine, monitor)
    with engine.connect() as connection:
        last = connection.execute(sa.select(sa.func.max(table.c.ts))).scalar()
    insert_rows(engine, table, Sensors(seed=3).anomalous(4),
                start=last.replace(tzinfo=dt.UTC) + dt.timedelta(minutes=1))
    registry = CollectorRegistry()
    worker = Worker(settings(db_url, monitor), engine, Metrics(registry), device="cpu")
    worker.run_once()
    labels = {"monitor": "plant"}
    assert registry.get_sample_value("anomaly_monitor_incidents_total", labels) == 1
    assert registry.get_sample_value("anomaly_monitor_incidents_open", labels) == 1
    with engine.connect() as connection:
        (incident,) = list_incidents(connection, "plant")
    value = registry.get_sample_value("anomaly_monitor_incident_severity",
                                      {**labels, "entity": "", "incident": str(incident["id"])})
    assert value == pytest.approx(incident["max_severity"], abs=0.05)
    # Above the alert level: no series; the count stays.
    high = dataclasses.replace(monitor, incidents=IncidentSettings(alert_severity=100.0))
    registry = CollectorRegistry()
    Worker(settings(db_url, high), engine, Metrics(registry), device="cpu").run_once()
    assert registry.get_sample_value("anomaly_monitor_incidents_open", labels) == 1
    assert not [s for m in registry.collect() if m.name == "anomaly_monitor_incident_severity"
                for s in m.samples]


def _flag(source_id: int, minute: float | None, severity: float = 50.0) -> dict:
    when = None if minute is None else START + dt.timedelta(minutes=minute)
    return {"monitor": "plant", "source_id": source_id, "source_timestamp": when,
            "score": 1.0, "threshold": 0.5, "severity": severity, "model_version": 1,
            "contributions": [{"feature": "f0", "share": 1.0, "value": 1.0}],
            "scored_at": NOW, "entity": None}


def _commit_flags(engine, flags: list[dict], newest_minute: float, now=None) -> int:
    """What a batch's commit does with its flags (without a cursor row: the horizon is
    the batch's newest row)."""
    from anomaly_monitor.incidents import record_incidents

    with engine.begin() as connection:
        opened = record_incidents(connection, "plant", 0, flags, gap_seconds=180.0,
                                  newest=START + dt.timedelta(minutes=newest_minute),
                                  now=now or NOW)
        if flags:
            connection.execute(anomalies.insert(), [{**f, "generation": 0} for f in flags])
    return opened


START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
NOW = START + dt.timedelta(days=1)


def test_a_late_row_between_two_stored_incidents_merges_them(engine):
    assert _commit_flags(engine, [_flag(10, 10), _flag(11, 11)], 11) == 1
    assert _commit_flags(engine, [_flag(20, 20)], 20) == 1  # 9 minutes later: another
    # A late batch: a flag at 5 (a new run, joined by 8) and 14 and 17, which bridge all.
    assert _commit_flags(engine, [_flag(5, 5), _flag(8, 8), _flag(14, 14), _flag(17, 17)],
                         20) == 0
    with engine.connect() as connection:
        (row,) = list_incidents(connection, "plant")
        pointers = set(connection.execute(sa.select(anomalies.c.incident_id)).scalars())
    assert (row["rows"], row["first_source_id"], row["last_source_id"]) == (7, 5, 20)
    assert pointers == {row["id"]} and row["id"] == 1  # the oldest absorbed the others
    assert incident_errors(engine, "plant", 180.0) == []


def test_rows_without_a_timestamp_or_stamped_far_ahead(engine):
    # No timestamp: joins the newest open incident, not every one.
    _commit_flags(engine, [_flag(1, 0)], 0)
    _commit_flags(engine, [_flag(2, 100)], 100)
    _commit_flags(engine, [_flag(3, None)], 100)
    with engine.connect() as connection:
        rows = {r["first_source_id"]: r for r in list_incidents(connection, "plant")}
    assert rows[2]["rows"] == 2 and rows[1]["rows"] == 1
    # Only flags without a timestamp: closed by the next batch.
    _commit_flags(engine, [_flag(4, None)], 300)
    _commit_flags(engine, [], 300, now=NOW + dt.timedelta(seconds=1))
    with engine.connect() as connection:
        assert list_incidents(connection, "plant", only_open=True) == []
    # A row stamped a year ahead neither closes the others nor stays open for a year.
    far = (NOW - START + dt.timedelta(days=365)).total_seconds() / 60
    _commit_flags(engine, [_flag(5, 400), _flag(6, far)], far)
    with engine.connect() as connection:
        states = {r["first_source_id"]: r["state"] for r in list_incidents(connection, "plant")}
    assert states[5] == "open" and states[6] == "open"
    _commit_flags(engine, [], 401, now=NOW + dt.timedelta(hours=1))
    with engine.connect() as connection:
        states = {r["first_source_id"]: r["state"] for r in list_incidents(connection, "plant")}
    assert states[6] == "closed"


def test_a_row_monitor_over_several_hosts_measures_its_gap_between_timestamps(engine):
    """Four rows share each timestamp: the sampling interval is the time between
    distinct timestamps (a minute), not a quarter of it."""
    from tests.helpers import source_table

    table = source_table(engine)
    values = Sensors().normal(800)
    start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    with engine.begin() as connection:
        connection.execute(table.insert(), [
            {"ts": start + dt.timedelta(minutes=i // 4), "label": 0,
             **{f"f{j}": float(v) for j, v in enumerate(row)}}
            for i, row in enumerate(values)])
    report = train_monitor(engine, monitor_settings(), device="cpu")
    assert report.version.training["sample_interval_seconds"] == pytest.approx(60.0)


def test_an_incident_opened_and_closed_in_one_catch_up_batch_still_alerts(db_url, engine):
    table, monitor, _, _ = trained_plant(engine)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    sensors = Sensors(seed=4)
    # A burst, then an hour of normal rows: one catch-up batch opens and closes it.
    insert_rows(engine, table, np.vstack([sensors.anomalous(3), sensors.normal(60)]),
                start=start, step_seconds=60.0)
    registry = CollectorRegistry()
    worker = Worker(settings(db_url, monitor), engine, Metrics(registry), device="cpu")
    worker.run_once()
    with engine.connect() as connection:
        burst = [r for r in list_incidents(connection, "plant", limit=100)
                 if r["rows"] >= 3 and r["max_severity"] >= monitor.incidents.alert_severity]
    assert burst and burst[0]["state"] == "closed"
    value = registry.get_sample_value(
        "anomaly_monitor_incident_severity",
        {"monitor": "plant", "entity": "", "incident": str(burst[0]["id"])})
    assert value == pytest.approx(burst[0]["max_severity"], abs=0.05)
    assert registry.get_sample_value("anomaly_monitor_incidents_open", {"monitor": "plant"}) \
        == 0
