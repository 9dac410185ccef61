"""Suppression windows on SQLite and PostgreSQL: one-off and recurring (in a time zone,
across a DST change) windows keep flags out of the alerting series, incidents and
alerts while the flags are stored and marked; skip_training keeps rows out of
training; overlapping or reversed windows are refused."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.config import IncidentSettings, RecurringWindow
from anomaly_monitor.lifecycle import train_monitor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.suppression import (
    SuppressionError,
    add_window,
    list_windows,
    recurring_spans,
    remove_window,
)
from anomaly_monitor.tables import anomalies, incidents
from anomaly_monitor.worker import Worker
from tests.helpers import Sensors, insert_rows, monitor_settings, settings, trained_plant

UTC = dt.UTC
NIGHTLY = RecurringWindow(name="nightly", cron="0 2 * * *", duration_seconds=3600,
                          timezone="Europe/Berlin", reason="backups")


def test_a_recurring_window_follows_its_time_zone_across_daylight_saving():
    spans = recurring_spans(NIGHTLY, dt.datetime(2026, 3, 27, tzinfo=UTC),
                            dt.datetime(2026, 3, 31, tzinfo=UTC))
    starts = [s.start for s in spans]
    # 02:00 in Berlin: 01:00 UTC in winter time, 00:00 UTC in summer time (from 29 March;
    # that night 02:00 does not exist and the window opens at 03:00 CEST, 01:00 UTC).
    assert starts[0] == dt.datetime(2026, 3, 27, 1, tzinfo=UTC)
    assert dt.datetime(2026, 3, 30, 0, tzinfo=UTC) in starts
    assert all(s.end - s.start == dt.timedelta(hours=1) for s in spans)
    assert all(s.name == "recurring nightly" and s.entity is None for s in spans)
    # A time inside a window opened before the range still counts.
    inside = recurring_spans(NIGHTLY, dt.datetime(2026, 1, 5, 1, 30, tzinfo=UTC),
                             dt.datetime(2026, 1, 5, 1, 40, tzinfo=UTC))
    assert [s.start for s in inside] == [dt.datetime(2026, 1, 5, 1, tzinfo=UTC)]
    assert recurring_spans(NIGHTLY, dt.datetime(2026, 1, 5, 2, tzinfo=UTC),
                           dt.datetime(2026, 1, 5, 3, tzinfo=UTC)) == []


def _after_history(engine, table) -> dt.datetime:
    with engine.connect() as connection:
        last = connection.execute(sa.select(sa.func.max(table.c.ts))).scalar()
    return last.replace(tzinfo=UTC) + dt.timedelta(minutes=1)


def _flags(engine) -> dict[int, tuple[str | None, int | None]]:
    with engine.connect() as connection:
        return {r.source_id: (r.suppressed_by, r.incident_id) for r in connection.execute(
            sa.select(anomalies.c.source_id, anomalies.c.suppressed_by,
                      anomalies.c.incident_id))}


def test_flags_in_a_window_are_stored_marked_and_raise_no_incident_or_alert(db_url, engine):
    monitor = monitor_settings(incidents=IncidentSettings(alert_severity=0.0))
    table, monitor, _, _ = trained_plant(engine, monitor)
    start = _after_history(engine, table)
    sensors = Sensors(seed=3)
    with engine.begin() as connection:
        window = add_window(connection, "plant", start, start + dt.timedelta(minutes=5),
                            reason="maintenance", author="ana")
    quiet = insert_rows(engine, table, sensors.anomalous(4), start=start)  # inside
    loud = insert_rows(engine, table, sensors.anomalous(3),  # 20 minutes later: outside
                       start=start + dt.timedelta(minutes=20))
    registry = CollectorRegistry()
    Worker(settings(db_url, monitor), engine, Metrics(registry), device="cpu").run_once()
    flags = _flags(engine)
    assert {flags[i] for i in quiet} == {(f"window {window}", None)}
    assert all(flags[i][0] is None and flags[i][1] is not None for i in loud)
    with engine.connect() as connection:
        (incident,) = connection.execute(sa.select(incidents)).all()
    assert incident.first_source_id == loud[0] and incident.rows == 3
    labels = {"monitor": "plant"}
    assert registry.get_sample_value("anomaly_monitor_rows_suppressed_total", labels) == 4
    assert registry.get_sample_value("anomaly_monitor_rows_flagged_total",
                                     labels) == len(flags) - 4
    assert registry.get_sample_value("anomaly_monitor_severity_count",
                                     labels) == len(flags) - 4
    assert registry.get_sample_value("anomaly_monitor_incidents_total", labels) == 1
    severities = [s for m in registry.collect() if m.name == "anomaly_monitor_incident_severity"
                  for s in m.samples]
    assert [s.labels["incident"] for s in severities] == [str(incident.id)]


def test_a_recurring_window_of_one_entity_in_a_time_zone(engine):
    from tests.helpers import drain
    from tests.integration.test_window_monitor import host_rows, train_hosts

    table, monitor, _, last = train_hosts(engine)
    rows = host_rows(last + 1, 200, seed=1, shift_host="b", shift_from=100)
    first_shifted = rows[100 * 3]["ts"]
    # A window of host b that opens 20 minutes after its shift, in UTC+05:30 local time.
    local = first_shifted.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
    opens = local + dt.timedelta(minutes=20)
    window = RecurringWindow(name="b-maintenance", cron=f"{opens.minute} {opens.hour} * * *",
                             duration_seconds=7200, timezone="Asia/Kolkata", entity="b")
    monitor = dataclasses.replace(monitor, suppress=(window,))
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)
    drain(engine, monitor)
    with engine.connect() as connection:
        flags = connection.execute(sa.select(anomalies.c.source_timestamp, anomalies.c.entity,
                                             anomalies.c.suppressed_by,
                                             anomalies.c.incident_id)).all()
    start = opens.replace(second=0, microsecond=0).astimezone(UTC)
    end = start + dt.timedelta(hours=2)
    for flag in flags:
        when = flag.source_timestamp.replace(tzinfo=UTC) if flag.source_timestamp.tzinfo \
            is None else flag.source_timestamp
        inside = flag.entity == "b" and start <= when < end
        assert (flag.suppressed_by == "recurring b-maintenance") == inside, flag
        assert (flag.incident_id is None) == inside
    assert any(f.suppressed_by for f in flags) and any(f.entity == "b" and not f.suppressed_by
                                                       for f in flags)


def test_skip_training_keeps_a_windows_rows_out_of_training(engine):
    table, monitor, _, report = trained_plant(engine)
    with engine.connect() as connection:
        first, _ = connection.execute(sa.select(sa.func.min(table.c.ts),
                                                   sa.func.max(table.c.ts))).one()
    first = first.replace(tzinfo=UTC)
    with engine.begin() as connection:
        add_window(connection, "plant", first + dt.timedelta(minutes=100),
                   first + dt.timedelta(minutes=130), skip_training=True, author="ana")
        add_window(connection, "plant", first + dt.timedelta(minutes=200),  # results only
                   first + dt.timedelta(minutes=260), author="ana")
    again = train_monitor(engine, dataclasses.replace(monitor, model={"epochs": 2}),
                          device="cpu", activate_version=False)
    training = again.version.training
    assert training["excluded"]["suppressed"] == 30 and training["excluded_rows"] == 30
    before = report.version.training
    assert training["rows"] + training["holdout_rows"] == \
        before["rows"] + before["holdout_rows"] - 30


def test_windows_that_overlap_or_end_before_they_start_are_refused(engine):
    t0 = dt.datetime(2026, 5, 1, tzinfo=UTC)
    hour = dt.timedelta(hours=1)
    with engine.begin() as connection:
        one = add_window(connection, "hosts", t0, t0 + 2 * hour, entity="a", author="ana")
        add_window(connection, "hosts", t0, t0 + 2 * hour, entity="b", author="ana")
        add_window(connection, "hosts", t0 + 2 * hour, t0 + 3 * hour, author="ana")  # touches
    for start, end, entity, message in [
        (t0 + hour, t0, None, "ends .* at or before it starts"),
        (t0, t0, "a", "at or before it starts"),
        (t0 + hour, t0 + 4 * hour, "a", f"overlaps window {one}"),
        (t0 - hour, t0 + dt.timedelta(minutes=1), None, f"overlaps window {one}"),
    ]:
        with engine.begin() as connection, pytest.raises(SuppressionError, match=message):
            add_window(connection, "hosts", start, end, entity=entity, author="ana")
    with engine.begin() as connection:
        with pytest.raises(SuppressionError, match="has no suppression window 999"):
            remove_window(connection, "hosts", 999)
        with pytest.raises(SuppressionError, match=f"has no suppression window {one}"):
            remove_window(connection, "other", one)
        remove_window(connection, "hosts", one)
        with pytest.raises(SuppressionError):
            remove_window(connection, "hosts", one)  # once
        again = add_window(connection, "hosts", t0 + hour, t0 + 2 * hour, entity="a",
                           author="ana")
        assert [w["id"] for w in list_windows(connection, "hosts")][-2:] != [one]
        assert one not in [w["id"] for w in list_windows(connection, "hosts")]
        shown = list_windows(connection, "hosts", removed=True)
    assert {w["id"] for w in shown} >= {one, again}
    assert next(w for w in shown if w["id"] == one)["removed_at"] is not None
