"""A drifting producer (a mean shift halfway through the stream) under kill -9 of the
daemon at seeded random moments: the drift rises, the daemon retrains a challenger
(killed during training too: no half-made version is ever stored), runs it in shadow,
promotes it by its gates; every flag records the version that scored it, and the am_
tables equal one uninterrupted pass of those versions."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.config import IncidentSettings, RetrainSettings
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import list_versions, load_model
from anomaly_monitor.shadow import shadow_totals
from anomaly_monitor.tables import anomalies, batches
from anomaly_monitor.worker import Worker
from tests.faults.harness import (
    Producer,
    check_exactly_once,
    kill_repeatedly,
    start_daemon,
    write_config,
)
from tests.helpers import FAST_MODEL, monitor_settings, settings, trained_plant, wait_for

KILLS = int(os.environ.get("AM_FAULT_KILLS_LIFECYCLE", "6"))
SEED = 20261203
SHIFT = 1.5
LEASE_SECONDS = 1.5
# One incident gap for both versions (by default each version's is three sampling
# intervals of its own training rows, and the oracle groups with one gap).
GAP_SECONDS = 60.0
RETRAIN = f"""
[monitor.incidents]
gap_seconds = {GAP_SECONDS}

[monitor.retrain]
on_drift = true
window_rows = 600
shadow_rows = 200
promote = "auto"

[monitor.model]
""" + "\n".join(f"{k} = {v}" for k, v in FAST_MODEL.items()) + "\n"


class ShiftingProducer(Producer):
    """The harness's producer (5% anomalies, 1% NULLs) whose rows move by ``SHIFT``
    on every feature once ``shifted`` is set."""

    shifted = False

    def _row(self) -> dict:
        row = super()._row()
        if self.shifted:
            row.update({k: v + SHIFT for k, v in row.items()
                        if k.startswith("f") and v is not None})
        return row


def _active(engine) -> int | None:
    with engine.connect() as connection:
        return next((v.version for v in list_versions(connection, "plant")
                     if v.status == "active"), None)


@pytest.mark.slow
def test_drift_retrain_shadow_promotion_under_kill_9(engine, db_url, tmp_path):
    table, monitor, _, _ = trained_plant(engine, monitor_settings(
        batch_size=40, interval_seconds=0.2, lease_seconds=LEASE_SECONDS,
        incidents=IncidentSettings(gap_seconds=GAP_SECONDS)))
    with engine.connect() as connection:
        start = read_cursor(connection, "plant").position
    config = write_config(tmp_path / "am.toml", db_url, lease=LEASE_SECONDS)
    config.write_text(config.read_text() + RETRAIN)
    rng = np.random.default_rng(SEED)
    producer = ShiftingProducer(engine, table, period=0.005)
    producer.start()
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    try:
        kills = kill_repeatedly(engine, config, log, KILLS // 2, rng)
        producer.shifted = True
        shifted_at = time.monotonic()
        kills += kill_repeatedly(engine, config, log, KILLS - KILLS // 2, rng)
        daemon = start_daemon(config, log)  # left alone until it promotes the challenger
        try:
            wait_for(lambda: _active(engine) == 2, timeout=240, interval=0.2)
            promoted_after = time.monotonic() - shifted_at
            time.sleep(float(rng.uniform(0.0, 0.4)))
        finally:
            daemon.kill()
            daemon.wait(timeout=30)
        kills += 1 + kill_repeatedly(engine, config, log, 2, rng)
    finally:
        producer.stop()
    full = dataclasses.replace(monitor, retrain=RetrainSettings(on_drift=True))
    Worker(settings(db_url, full), engine, Metrics(CollectorRegistry()),
           device="cpu").run_once()
    verdict = check_exactly_once(engine, monitor, start)
    with engine.connect() as connection:
        versions = {v.version: v for v in list_versions(connection, "plant")}
        for v in versions.values():  # every stored version is whole and loads
            load_model(connection, "plant", v.version, device="cpu")
        totals = shadow_totals(connection, "plant", 2)
        per_version = dict(connection.execute(
            sa.select(anomalies.c.model_version, sa.func.count())
            .group_by(anomalies.c.model_version)).all())
        scored = dict(connection.execute(
            sa.select(batches.c.model_version, sa.func.sum(batches.c.rows))
            .group_by(batches.c.model_version)).all())
    print(f"\n{engine.dialect.name}: {kills} kills in {time.monotonic() - started:.0f} s, "
          f"promoted {promoted_after:.0f} s after the shift, {verdict.rows} rows, "
          f"flags by version {per_version} of rows {scored}, shadow rows {totals.rows}, "
          f"duplicates {verdict.duplicates}, lost {len(verdict.lost)}, wrong flags "
          f"{len(verdict.wrong_flags)}")
    assert verdict.duplicates == 0 and verdict.lost == [] and verdict.extra == []
    assert verdict.wrong_flags == []  # each flag by the version its batch records
    assert verdict.incident_errors == []
    assert versions[2].training["trigger"] == "drift"
    assert versions[2].validation["decision"]["by"] == "gates"
    assert versions[1].status == "retired" and totals.rows >= 200
    # Version 1 flags most shifted rows; version 2 what is anomalous among them.
    rate = {v: per_version.get(v, 0) / scored[v] for v in (1, 2)}
    assert rate[2] < rate[1] / 2, rate
