"""The per-monitor runner: what ends a poll, and what it does then."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

import anomaly_monitor.runner as runner_module
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.source import SchemaError
from anomaly_monitor.worker import Worker
from tests.helpers import Sensors, insert_rows, monitor_settings, settings, trained_plant


def test_a_monitor_paused_mid_poll_keeps_its_reason_and_is_not_swept(engine, db_url,
                                                                      monkeypatch):
    sensors = Sensors()
    table, monitor, _, _ = trained_plant(engine, monitor_settings(batch_size=10),
                                         sensors=sensors)
    insert_rows(engine, table, sensors.normal(30))
    real_run_batch, calls, swept = runner_module.run_batch, [], []

    def second_batch_finds_the_table_changed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SchemaError("table 'readings' has no column 'f3' any more")
        return real_run_batch(*args, **kwargs)

    monkeypatch.setattr(runner_module, "run_batch", second_batch_finds_the_table_changed)
    monkeypatch.setattr(runner_module, "sweep_late_rows",
                        lambda *a, **k: swept.append(1))
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    state = worker.poll("plant")
    assert state.status == "paused" and "no column 'f3'" in state.detail
    assert state.rows == 10 and swept == []
    with engine.connect() as connection:
        assert "no column 'f3'" in read_cursor(connection, "plant").pause_reason


def test_status_shows_who_holds_the_lease_until_when(engine, db_url):
    from anomaly_monitor.report import monitor_status

    _, monitor, _, _ = trained_plant(engine)
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    with engine.connect() as connection:
        assert monitor_status(connection, monitor)["lease"] is None
    worker.poll("plant")
    with engine.connect() as connection:
        lease = monitor_status(connection, monitor)["lease"]
    assert lease["owner"] == worker.owner and not lease["expired"]
    assert lease["expires_at"].startswith("20")
    worker.release_leases()
    with engine.connect() as connection:
        assert monitor_status(connection, monitor)["lease"] is None


def test_a_monitor_sharing_threads_gives_its_arrow_connection_back_after_each_poll(
        engine, db_url):
    from tests.helpers import bulk_insert

    sensors = Sensors(seed=31)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(batch_size=2_000),
                                         sensors=sensors)
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    runner = worker.runners["plant"]
    held = {}
    for share in (1.0, 0.25):
        bulk_insert(engine, table, sensors.normal(6_000))
        runner.share = share
        state = worker.poll("plant", budget_seconds=float("inf"))
        assert state.status == "running" and state.rows >= 6_000
        arrow = state.read_state.arrow
        held[share] = arrow is not None and arrow._backend is not None
    assert held == {1.0: True, 0.25: False}
