"""kill -9 of the daemon while a window monitor with entities scores: after the last
restart, the flags equal one uninterrupted pass over the rows from the states training
left, and every row is consumed once (the states commit with the cursor).

AM_FAULT_KILLS sets the number of kills per database (default here: 8).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.calibration import Threshold
from anomaly_monitor.config import WindowSettings
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.entities import read_states
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import load_model, set_threshold
from anomaly_monitor.tables import anomalies
from anomaly_monitor.worker import Worker
from tests.faults.harness import (
    Producer,
    check_exactly_once,
    kill_repeatedly,
    write_config,
)
from tests.helpers import monitor_settings, settings, trained_plant

KILLS = int(os.environ.get("AM_FAULT_KILLS", "8"))
SEED = 20261202
LEASE_SECONDS = 1.5
WINDOW = WindowSettings(size=4, derived=("spread",), baseline_half_life=100.0)
HOSTS = ("h1", "h2", "h3")


class HostProducer(Producer):
    """The harness's producer, each row from one of three hosts (the ``note`` column)."""

    def _row(self) -> dict:
        row = super()._row()
        row["note"] = HOSTS[int(self.sensors.rng.integers(len(HOSTS)))]
        return row


@pytest.mark.slow
def test_kill_9_keeps_window_monitors_exactly_once(engine, db_url, tmp_path):
    monitor = monitor_settings(batch_size=40, interval_seconds=0.2,
                               lease_seconds=LEASE_SECONDS, entity_column="note",
                               window=WINDOW)
    table, monitor, _, _ = trained_plant(engine, monitor)
    with engine.begin() as connection:  # a low threshold: many flags to compare
        set_threshold(connection, "plant", 1, Threshold(0.8, "fixed"))
    with engine.connect() as connection:
        start = read_cursor(connection, "plant").position
        model = load_model(connection, "plant", 1, device="cpu")
        states = read_states(connection, "plant", 1, ["", *HOSTS], model.window)
    config = write_config(tmp_path / "am.toml", db_url, lease=LEASE_SECONDS)
    config.write_text(config.read_text() + 'entity_column = "note"\n\n[monitor.window]\n'
                      f'size = {WINDOW.size}\nderived = ["spread"]\n'
                      f'baseline_half_life = {WINDOW.baseline_half_life}\n')
    rng = np.random.default_rng(SEED)
    producer = HostProducer(engine, table, period=0.01)
    producer.start()
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    try:
        kills = kill_repeatedly(engine, config, log, KILLS, rng)
    finally:
        producer.stop()
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    worker.run_once()
    verdict = check_exactly_once(engine, monitor, start, states)
    with engine.connect() as connection:
        flagged_hosts = set(connection.execute(sa.select(anomalies.c.entity)).scalars())
    print(f"\n{engine.dialect.name}: {kills} kills in {time.monotonic() - started:.0f} s, "
          f"{verdict.rows} rows, {verdict.flagged} flagged, wrong flags "
          f"{len(verdict.wrong_flags)}")
    assert kills == KILLS and producer.inserted > 100
    assert verdict.duplicates == 0 and verdict.lost == [] and verdict.extra == []
    assert verdict.wrong_flags == [] and verdict.flagged > 20
    assert verdict.incident_errors == []  # no incident split or duplicated by a kill
    assert flagged_hosts <= set(HOSTS)
