"""Operator feedback on SQLite and PostgreSQL: labels round-trip with their history,
incidents pass their label to their flags, a false-positive incident raises no alert,
the metrics of a poll, and labels used by calibration and training."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.calibration_plan import plan_calibration
from anomaly_monitor.config import ConfigError, IncidentSettings, ThresholdSettings
from anomaly_monitor.feedback import (
    FeedbackError,
    excluded_ids,
    feedback_counts,
    history,
    label,
    recent_precision,
)
from anomaly_monitor.incidents import alerting_incidents
from anomaly_monitor.lifecycle import train_monitor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.report import list_anomalies, list_incidents
from anomaly_monitor.tables import anomalies, feedback, incidents, utcnow
from anomaly_monitor.worker import Worker
from tests.helpers import Sensors, drain, insert_rows, monitor_settings, settings, trained_plant
from tests.integration.test_incidents import _episodes


def _flags(engine) -> dict[int, tuple[int, str | None]]:
    """source id: (incident id, label) of every flag."""
    with engine.connect() as connection:
        return {r.source_id: (r.incident_id, r.label) for r in connection.execute(
            sa.select(anomalies.c.source_id, anomalies.c.incident_id, anomalies.c.label))}


def _incident_labels(engine) -> dict[int, str | None]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(incidents.c.id, incidents.c.label)).all())


def _two_incidents(engine, monitor=None):
    table, monitor, _, report = trained_plant(engine, monitor)
    first_run, second_run = _episodes(engine, table)
    drain(engine, monitor)
    flags = _flags(engine)
    return table, monitor, report, first_run, second_run, flags


def test_labels_round_trip_with_history_and_a_later_label_superseding(engine):
    _, _, _, first_run, second_run, flags = _two_incidents(engine)
    one, two = flags[first_run[0]][0], flags[second_run[0]][0]
    with engine.begin() as connection:
        done = label(connection, "plant", [two], "tp", incident=True, note="pump failure",
                     author="ana")
    assert done.incidents == [two] and done.flags == sum(1 for i, _ in flags.values() if i == two)
    # One flag of the tp incident is a false positive after all; and a flag of the first.
    with engine.begin() as connection:
        label(connection, "plant", [second_run[0], first_run[0]], "fp", author="bo")
    flags = _flags(engine)
    assert flags[second_run[0]][1] == "fp" and flags[first_run[0]][1] == "fp"
    assert {lab for i, lab in flags.values() if i == two} == {"tp", "fp"}
    assert _incident_labels(engine)[two] == "tp" and _incident_labels(engine)[one] is None
    # Relabel the first flag: superseded, history kept.
    with engine.begin() as connection:
        label(connection, "plant", [first_run[0]], "tp", author="ana")
        rows = history(connection, "plant")
        assert feedback_counts(connection, "plant") == {"tp": 2, "fp": 2}
        by_label = {lab: len(list_anomalies(connection, "plant", label=lab, limit=1000))
                    for lab in ("tp", "fp", "none")}
        assert [r["id"] for r in list_incidents(connection, "plant", label="tp")] == [two]
        assert [r["id"] for r in list_incidents(connection, "plant", label="none")] == [one]
    assert [(r["target"], r["label"], r["author"]) for r in rows] == [
        ("flag", "tp", "ana"), ("flag", "fp", "bo"), ("flag", "fp", "bo"),
        ("incident", "tp", "ana")]
    assert rows[-1]["note"] == "pump failure" and rows[-1]["target_id"] == two
    assert [r["source_id"] for r in rows[1:3]] == sorted([first_run[0], second_run[0]],
                                                         reverse=True)  # newest first
    assert _flags(engine)[first_run[0]][1] == "tp"
    assert sum(by_label.values()) == len(flags)
    assert by_label["fp"] == 1 and by_label["tp"] == sum(
        1 for i, _ in flags.values() if i == two)  # tp: the incident's others and first_run[0]


def test_unknown_ids_are_refused_and_nothing_is_written(engine):
    _, _, _, first_run, _, _ = _two_incidents(engine)
    before = _flags(engine)
    with engine.begin() as connection:
        with pytest.raises(FeedbackError, match=r"no flagged row with id 999999\b"):
            label(connection, "plant", [first_run[0], 999999], "fp", author="ana")
        with pytest.raises(FeedbackError, match="no incident with id 424242"):
            label(connection, "plant", [424242], "fp", incident=True, author="ana")
        with pytest.raises(FeedbackError, match="no flagged row"):  # another monitor's
            label(connection, "other", [first_run[0]], "fp", author="ana")
    assert _flags(engine) == before
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(feedback)).scalar() == 0


def test_flags_joining_a_labelled_incident_take_its_label_and_an_fp_incident_is_silent(
        db_url, engine):
    monitor = monitor_settings(incidents=IncidentSettings(alert_severity=0.0))
    table, monitor, _, _ = trained_plant(engine, monitor)
    with engine.connect() as connection:
        last = connection.execute(sa.select(sa.func.max(table.c.ts))).scalar()
    start = last.replace(tzinfo=dt.UTC) + dt.timedelta(minutes=1)
    sensors = Sensors(seed=3)
    insert_rows(engine, table, sensors.anomalous(3), start=start)
    registry = CollectorRegistry()
    worker = Worker(settings(db_url, monitor), engine, Metrics(registry), device="cpu")
    worker.run_once()
    labels = {"monitor": "plant"}
    assert math.isnan(registry.get_sample_value("anomaly_monitor_feedback_precision", labels))
    assert registry.get_sample_value("anomaly_monitor_feedback_total",
                                     {**labels, "label": "fp"}) == 0
    with engine.connect() as connection:
        (incident,) = list_incidents(connection, "plant")
        assert alerting_incidents(connection, "plant", 0.0, utcnow())
    assert incident["state"] == "open"
    with engine.begin() as connection:
        label(connection, "plant", [incident["id"]], "fp", incident=True, author="ana")
    # Two more anomalous rows a minute later join the open incident, labelled fp.
    insert_rows(engine, table, sensors.anomalous(2), start=start + dt.timedelta(minutes=3))
    worker.run_once()
    flags = _flags(engine)
    assert len(flags) == 5 and set(flags.values()) == {(incident["id"], "fp")}
    with engine.connect() as connection:
        assert alerting_incidents(connection, "plant", 0.0, utcnow()) == []
    assert not [s for m in registry.collect() if m.name == "anomaly_monitor_incident_severity"
                for s in m.samples]
    assert registry.get_sample_value("anomaly_monitor_feedback_total",
                                     {**labels, "label": "fp"}) == 1
    assert registry.get_sample_value("anomaly_monitor_feedback_precision", labels) == 0.0
    with engine.begin() as connection:  # one flag was real after all
        label(connection, "plant", [min(flags)], "tp", author="ana")
    worker.run_once()
    assert registry.get_sample_value("anomaly_monitor_feedback_total",
                                     {**labels, "label": "tp"}) == 1
    assert registry.get_sample_value("anomaly_monitor_feedback_precision",
                                     labels) == pytest.approx(1 / 5)
    with engine.connect() as connection:
        assert recent_precision(connection, "plant") == (pytest.approx(0.2), 5)
    # A restarted worker counts from its first read: no burst of every label ever given.
    registry = CollectorRegistry()
    Worker(settings(db_url, monitor), engine, Metrics(registry), device="cpu").run_once()
    assert registry.get_sample_value("anomaly_monitor_feedback_total",
                                     {**labels, "label": "fp"}) == 0
    assert registry.get_sample_value("anomaly_monitor_feedback_precision",
                                     labels) == pytest.approx(1 / 5)


def test_training_leaves_out_rows_labelled_true_anomalies(engine):
    table, monitor, _, first_run, second_run, flags = _two_incidents(engine)
    with engine.begin() as connection:
        total = connection.execute(sa.select(sa.func.count()).select_from(table)).scalar()
        label(connection, "plant", first_run, "tp", author="ana")
        label(connection, "plant", second_run, "fp", author="ana")
        last = max(flags)
        assert excluded_ids(connection, "plant", 0, last, ["labelled"]).tolist() == first_run
        assert len(excluded_ids(connection, "plant", 0, last, ["flagged"])) == len(flags)
        assert excluded_ids(connection, "plant", 0, last, []).size == 0
    trained = train_monitor(engine, dataclasses.replace(monitor, model={"epochs": 2}),
                            device="cpu", activate_version=False)
    training = trained.version.training
    assert training["excluded_rows"] == len(first_run)
    assert training["excluded"] == {"labelled": len(first_run), "suppressed": 0}
    assert training["rows"] + training["holdout_rows"] == total - len(first_run)
    flagged = train_monitor(engine, dataclasses.replace(monitor, model={"epochs": 2}),
                            device="cpu", activate_version=False, exclude=["flagged"])
    assert flagged.version.training["excluded_rows"] == len(flags)


def test_calibrate_by_labels_from_feedback(engine):
    _, monitor, _, first_run, second_run, flags = _two_incidents(engine)
    method = ThresholdSettings(method="labels")
    with pytest.raises(ConfigError, match="no flag labelled a true positive"):
        plan_calibration(engine, monitor, method)
    with engine.begin() as connection:
        label(connection, "plant", first_run + second_run, "tp", author="ana")
        others = sorted(set(flags) - set(first_run) - set(second_run))
        if others:
            label(connection, "plant", others, "fp", author="ana")
    plan = plan_calibration(engine, monitor, method)
    assert plan.labels_from == "feedback"
    assert plan.labelled_rows == len(flags) and plan.labelled_anomalies == 15
    chosen = next(c for c in plan.candidates if c.label.startswith("chosen"))
    assert chosen.threshold.method == "labels" and chosen.f1 is not None
    current = next(c for c in plan.candidates if c.label == "current")
    assert current.recall == 1.0  # every labelled flag scored above the threshold that made it
    assert current.precision == pytest.approx(15 / len(flags))
    assert chosen.f1 >= current.f1
    robust = [c for c in plan.candidates if c.threshold.method == "robust"]
    assert all(c.precision is None or 0 <= c.precision <= 1 for c in robust)
    assert np.all(np.isfinite(plan.labelled[0]))


def test_a_window_monitor_calibrates_on_its_own_labelled_flags_and_trains_around_them(engine):
    from tests.integration.test_window_monitor import host_rows, train_hosts

    table, monitor, _, last = train_hosts(engine)
    with engine.begin() as connection:
        connection.execute(table.insert(), host_rows(last + 1, 200, seed=1, shift_host="b",
                                                     shift_from=100))
    drain(engine, monitor)
    with engine.connect() as connection:
        flags = connection.execute(sa.select(anomalies.c.source_id, anomalies.c.entity,
                                             anomalies.c.score)).all()
    b = sorted(f.source_id for f in flags if f.entity == "b")
    others = sorted(f.source_id for f in flags if f.entity != "b")
    assert b
    with engine.begin() as connection:
        label(connection, "hosts", b, "tp", author="ana")
        if others:
            label(connection, "hosts", others, "fp", author="ana")
    plan = plan_calibration(engine, monitor, ThresholdSettings(method="labels"))
    assert plan.labels_from == "feedback" and plan.labelled_rows == len(flags)
    assert plan.labelled_anomalies == len(b)
    scores = dict((f.source_id, f.score) for f in flags)  # the stored scores of version 1
    assert sorted(plan.labelled[0]) == pytest.approx(sorted(scores.values()))
    # Training keeps b's shifted rows as context but fits and calibrates without them.
    again = train_monitor(engine, dataclasses.replace(monitor, model={"epochs": 2}),
                          device="cpu", activate_version=False)
    kept = train_monitor(engine, dataclasses.replace(monitor, model={"epochs": 2}),
                         device="cpu", activate_version=False, exclude=[])
    left, full = again.version.training, kept.version.training
    assert left["excluded_rows"] == len(b) and full["excluded_rows"] == 0
    held_out = sum(1 for i in b if i >= full["holdout_first_id"])
    assert full["holdout_rows"] - left["holdout_rows"] == held_out
    assert full["fit_rows"] - left["fit_rows"] == len(b) - held_out
    assert left["rows"] == full["rows"]  # the rows stay, as context


def test_alert_levels_measured_on_labelled_incidents(engine):
    from anomaly_monitor.feedback import alert_levels, best_alert_level

    now = utcnow()
    rows = [(95.0, "tp"), (80.0, "tp"), (60.0, "fp"), (30.0, "fp"), (10.0, "fp"),
            (99.0, None)]
    with engine.begin() as connection:
        for i, (severity, verdict) in enumerate(rows):
            connection.execute(incidents.insert().values(
                monitor="plant", generation=0, entity=None, first_source_id=i,
                last_source_id=i, rows=1, max_severity=severity, feature_shares={},
                state="closed", label=verdict, model_version=1, opened_at=now,
                updated_at=now, closed_at=now))
        table = {row["alert_severity"]: row for row in alert_levels(connection, "plant")}
        assert alert_levels(connection, "other") == []
    assert table[0.0]["alerts"] == 5 and table[0.0]["precision"] == pytest.approx(0.4)
    assert table[50.0]["true"] == 2 and table[50.0]["false"] == 1
    assert table[75.0]["precision"] == 1.0 and table[75.0]["recall"] == 1.0
    assert table[90.0]["recall"] == 0.5
    assert best_alert_level(list(table.values())) == 75.0
