"""kill -9 of the daemon at seeded random moments while rows arrive: after the last
restart the am_ tables equal one uninterrupted run of the same model.

AM_FAULT_KILLS sets the number of kills per database (default 20; e.g. 500 for a long run).
"""

from __future__ import annotations

import datetime as dt
import os
import time

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.suppression import add_window
from anomaly_monitor.tables import anomalies, as_utc
from anomaly_monitor.worker import Worker
from tests.faults.harness import (
    Producer,
    check_exactly_once,
    kill_repeatedly,
    write_config,
)
from tests.helpers import (
    monitor_settings,
    settings,
    trained_plant,
)

KILLS = int(os.environ.get("AM_FAULT_KILLS", "20"))
SEED = 20261127
LEASE_SECONDS = 1.5


@pytest.mark.slow
def test_kill_9_loses_and_duplicates_nothing(engine, db_url, tmp_path):
    table, monitor, _, _ = trained_plant(engine, monitor_settings(
        batch_size=40, interval_seconds=0.2, lease_seconds=LEASE_SECONDS))
    with engine.connect() as connection:
        start = read_cursor(connection, "plant").position
    config = write_config(tmp_path / "am.toml", db_url, lease=LEASE_SECONDS)
    rng = np.random.default_rng(SEED)
    # A suppression window over a few seconds of the run: its flags are marked, in the
    # batch transaction, exactly once like the rest.
    opens = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    with engine.begin() as connection:
        add_window(connection, "plant", opens, opens + dt.timedelta(seconds=4), author="test")
    # Two producers; on PostgreSQL the second holds its transactions open for up to
    # 50 ms, so that rows commit out of id order while the daemon is killed.
    slow = engine.dialect.name == "postgresql"
    producers = [Producer(engine, table), Producer(engine, table, period=0.03, seed=12,
                                                   hold=0.05 if slow else 0.0)]
    for producer in producers:
        producer.start()
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    try:
        kills = kill_repeatedly(engine, config, log, KILLS, rng)
    finally:
        for producer in producers:
            producer.stop()
    # No wait for the last victim's lease: a dead leader on this host is taken over at once.
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    worker.run_once()
    verdict = check_exactly_once(engine, monitor, start)
    print(f"\n{engine.dialect.name}: {kills} kills in {time.monotonic() - started:.0f} s, "
          f"{verdict.rows} rows checked, {verdict.batches} batches, {verdict.flagged} flagged, "
          f"{verdict.quarantined} quarantined, duplicates {verdict.duplicates}, "
          f"lost {len(verdict.lost)}, wrong flags {len(verdict.wrong_flags)}")
    assert kills == KILLS and sum(p.inserted for p in producers) > 100
    assert verdict.duplicates == 0 and verdict.lost == [] and verdict.extra == []
    assert verdict.wrong_flags == []
    assert verdict.incident_errors == []  # no incident split or duplicated by a kill
    assert verdict.quarantined > 0 and verdict.flagged > 0
    with engine.connect() as connection:
        flags = connection.execute(sa.select(anomalies.c.source_timestamp,
                                             anomalies.c.suppressed_by,
                                             anomalies.c.incident_id)).all()
    inside = [opens <= as_utc(f.source_timestamp) < opens + dt.timedelta(seconds=4)
              for f in flags]
    assert [f.suppressed_by is not None for f in flags] == inside and any(inside)
    assert all((f.incident_id is None) == i for f, i in zip(flags, inside, strict=True))
