"""The daemon rides out PostgreSQL crashing (``pg_ctl stop -m immediate``) and freezing
(SIGSTOP for 30 s): it recovers within two intervals of the database's return, leaves no
transaction idle, loses and duplicates nothing, and still stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from anomaly_monitor import migrate
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.db import create_engine
from tests.faults.harness import (
    Producer,
    batch_count,
    check_exactly_once,
    start_daemon,
    write_config,
)
from tests.helpers import (
    monitor_settings,
    trained_plant,
    wait_for,
)
from tests.pgserver import find_bin, running_server

INTERVAL = 0.5
FREEZE_SECONDS = 30
DOWN_SECONDS = 3


def signal_cluster(datadir: Path, sig: signal.Signals) -> None:
    """Send ``sig`` to the postmaster and all of its children."""
    postmaster = int((datadir / "postmaster.pid").read_text().split()[0])
    subprocess.run(["pkill", f"-{sig.name[3:]}", "-P", str(postmaster)], check=False)
    os.kill(postmaster, sig)


def idle_transactions(engine: sa.Engine) -> int:
    """The daemon's sessions idle inside a transaction for more than 5 s."""
    with engine.connect() as connection:
        return int(connection.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'anomaly-monitor %'"
            " AND state = 'idle in transaction' AND now() - state_change > interval '5 s'"
            " AND pid <> pg_backend_pid()")).scalar())


@pytest.mark.slow
def test_crash_and_freeze_of_postgresql(tmp_path):
    if find_bin("initdb") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries are missing but CI=true")
        pytest.skip("PostgreSQL is not installed")
    with running_server() as server:
        name = server.create_database(template=None)
        url = server.url(name)
        engine = create_engine(url)
        migrate.upgrade(engine)
        table, monitor, _, _ = trained_plant(
            engine, monitor_settings(batch_size=50, interval_seconds=INTERVAL))
        with engine.connect() as connection:
            start = read_cursor(connection, "plant").position
        config = write_config(tmp_path / "am.toml", url, interval=INTERVAL, batch_size=50,
                              lease=5.0)
        producer = Producer(engine, table, period=0.02)
        producer.start()
        daemon = start_daemon(config, tmp_path / "daemon.log")
        recoveries = {}
        try:
            wait_for(lambda: batch_count(engine) > 0, timeout=60)
            # 1. A crash: immediate shutdown mid-batch, back after a few seconds.
            server.stop("immediate")
            time.sleep(DOWN_SECONDS)
            server.start()
            before = batch_count(engine)
            recoveries["restart"] = wait_for(lambda: batch_count(engine) > before, timeout=60)
            # 2. A freeze: every PostgreSQL process stopped for 30 s.
            signal_cluster(server.datadir, signal.SIGSTOP)
            time.sleep(FREEZE_SECONDS)
            signal_cluster(server.datadir, signal.SIGCONT)
            before = batch_count(engine)
            recoveries["freeze"] = wait_for(lambda: batch_count(engine) > before, timeout=60)
            assert idle_transactions(engine) == 0
            # 3. SIGTERM while rows still arrive: the batch commits or rolls back, exit 0.
            stop_started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=10) == 0
            recoveries["sigterm_exit"] = time.monotonic() - stop_started
        finally:
            producer.stop()
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        # Drain what arrived after the stop, then check every row.
        drain = start_daemon(config, tmp_path / "drain.log")
        try:
            wait_for(lambda: _caught_up(engine, table), timeout=120, interval=0.2)
        finally:
            drain.send_signal(signal.SIGTERM)
            drain.wait(timeout=10)
        verdict = check_exactly_once(engine, monitor, start)
        engine.dispose()
    print(f"\nrecovery after restart {recoveries['restart']:.2f} s, after the "
          f"{FREEZE_SECONDS} s freeze {recoveries['freeze']:.2f} s (interval {INTERVAL} s); "
          f"SIGTERM exit in {recoveries['sigterm_exit']:.2f} s; {verdict.rows} rows checked, "
          f"{producer.errors} producer errors")
    assert recoveries["restart"] <= 2 * INTERVAL + 5  # + reconnect and a batch on 2 cores
    assert recoveries["freeze"] <= 2 * INTERVAL + 5
    assert verdict.duplicates == 0 and verdict.lost == [] and verdict.wrong_flags == []
    assert verdict.incident_errors == []


def _caught_up(engine: sa.Engine, table: sa.Table) -> bool:
    with engine.connect() as connection:
        newest = connection.execute(sa.select(sa.func.max(table.c.id))).scalar()
        cursor = read_cursor(connection, "plant")
    return cursor is not None and cursor.position == newest
