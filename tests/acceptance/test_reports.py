"""What the operator reads: anomalies by the row's own time with their threshold, the
quarantined rows and their reasons, quarantine counts in status, a log line when a
monitor switches model version or threshold, a quiet ``run --once``."""

from __future__ import annotations

import datetime as dt
import json
import logging

from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from anomaly_monitor.cli import main
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import set_threshold
from anomaly_monitor.worker import Worker
from tests.helpers import (
    FEATURES,
    Sensors,
    daemon_config,
    insert_rows,
    monitor_settings,
    settings,
    trained_plant,
)


def _cli(tmp_path, engine, *args: str) -> str:
    config = tmp_path / "am.toml"
    config.write_text(daemon_config(engine, FEATURES, 1.0))
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_anomalies_quarantine_and_status_show_what_was_found(engine, tmp_path):
    sensors = Sensors(seed=41)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(), sensors=sensors)
    old = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    insert_rows(engine, table, sensors.anomalous(5), start=old)
    recent = insert_rows(engine, table, sensors.anomalous(5), start=old + dt.timedelta(days=30))
    insert_rows(engine, table, [[None, *row[1:]] for row in sensors.normal(3)],
                start=old + dt.timedelta(days=31))
    worker = Worker(settings(engine.url.render_as_string(hide_password=False), monitor),
                    engine, Metrics(CollectorRegistry()), device="cpu")
    worker.poll("plant")
    rows = json.loads(_cli(tmp_path, engine, "anomalies", "plant", "--since", "2026-01-15",
                           "--json"))
    assert rows and {r["source_id"] for r in rows} <= set(recent)  # by the row's own time
    # The times the tool prints are accepted back, with their offset.
    for since in ("2026-01-15T00:00:00+00:00", "2026-01-15T00:00:00Z",
                  "2026-01-15T01:00:00+01:00", "2026-01-15 00:00"):
        assert json.loads(_cli(tmp_path, engine, "anomalies", "plant", "--since", since,
                               "--json")) == rows, since
    assert "threshold" in _cli(tmp_path, engine, "anomalies", "plant").splitlines()[0]
    listed = json.loads(_cli(tmp_path, engine, "quarantine", "plant", "--json"))
    assert len(listed) == 3 and {r["reason"] for r in listed} == {"null"}
    assert listed[0]["raw_values"]["f0"] is None
    assert "f0=None" in _cli(tmp_path, engine, "quarantine", "plant", "--reason", "null")
    assert json.loads(_cli(tmp_path, engine, "quarantine", "plant", "--reason", "nan",
                           "--json")) == []
    status = json.loads(_cli(tmp_path, engine, "status", "--json"))["monitors"][0]
    assert status["quarantined"] == {"null": 3}
    assert status["table"] in ("main.readings", "public.readings")  # schema-qualified
    assert 0 <= status["seconds_since_poll"] < 30  # apart from the newest row's age
    assert "polled s ago" in _cli(tmp_path, engine, "status")


def test_check_names_a_paused_monitor(engine, tmp_path):
    from anomaly_monitor.cursors import set_paused

    trained_plant(engine, monitor_settings())
    with engine.begin() as connection:
        set_paused(connection, "plant", "a test pause")
    config = tmp_path / "am.toml"
    config.write_text(daemon_config(engine, FEATURES, 1.0))
    result = CliRunner().invoke(main, ["--config", str(config), "check"])
    assert result.exit_code == 2
    assert "PROBLEM: monitor plant: paused by the worker: a test pause" in result.output


def test_a_new_threshold_is_logged_once_and_run_once_is_quiet_about_leases(
        engine, tmp_path, caplog):
    sensors = Sensors(seed=42)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(), sensors=sensors)
    worker = Worker(settings(engine.url.render_as_string(hide_password=False), monitor),
                    engine, Metrics(CollectorRegistry()), device="cpu")
    insert_rows(engine, table, sensors.normal(3))
    with caplog.at_level(logging.INFO, logger="anomaly_monitor"):
        worker.poll("plant")
        with engine.begin() as connection:
            from anomaly_monitor.calibration import Threshold

            set_threshold(connection, "plant", 1, Threshold(123.0, "fixed"))
        insert_rows(engine, table, sensors.normal(3))
        worker.poll("plant")
        worker.poll("plant")
    assert caplog.text.count("now scoring with version 1, threshold 123") == 1
    caplog.clear()
    insert_rows(engine, table, sensors.normal(3))
    with caplog.at_level(logging.INFO, logger="anomaly_monitor"):
        once = Worker(settings(engine.url.render_as_string(hide_password=False), monitor),
                      engine, Metrics(CollectorRegistry()), device="cpu")
        once.run_once()
    assert "lease acquired" not in caplog.text
