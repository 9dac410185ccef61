"""Signals to the running daemon: SIGHUP reloads (the same process starts again with
the configuration read afresh; an invalid one is refused and logged), log lines are
in UTC, and the scheduler's skipped-run warnings are rate-limited."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import sqlalchemy as sa

from anomaly_monitor.cli import UtcFormatter
from anomaly_monitor.tables import cursors
from anomaly_monitor.worker import SKIPPED_LOG_SECONDS, SkippedRunFilter
from tests.helpers import (
    Sensors,
    daemon_config,
    insert_rows,
    monitor_settings,
    rows_in_batches,
    trained_plant,
    wait_for,
)


def _holder(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        return connection.execute(sa.select(cursors.c.lease_owner)).scalar()


def test_sighup_reloads_the_configuration_in_the_same_process(engine, tmp_path):
    sensors = Sensors(seed=12)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(), sensors=sensors)
    config = tmp_path / "am.toml"
    config.write_text(daemon_config(engine, monitor.features, 1))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "anomaly_monitor", "--config", str(config), "run"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        insert_rows(engine, table, sensors.normal(5))
        wait_for(lambda: rows_in_batches(engine) == 5, timeout=60, interval=0.2)
        first = _holder(engine)
        config.write_text("[database\nbroken")  # refused: the daemon goes on as it was
        daemon.send_signal(signal.SIGHUP)
        time.sleep(1)
        insert_rows(engine, table, sensors.normal(5))
        wait_for(lambda: rows_in_batches(engine) == 10, timeout=20, interval=0.2)
        assert daemon.poll() is None and _holder(engine) == first
        config.write_text(daemon_config(engine, monitor.features, 2))
        daemon.send_signal(signal.SIGHUP)
        # The lease is released, and taken again by the restarted run (same pid).
        wait_for(lambda: _holder(engine) not in (None, first), timeout=60, interval=0.2)
        assert str(daemon.pid) in _holder(engine)
        insert_rows(engine, table, sensors.normal(5))
        wait_for(lambda: rows_in_batches(engine) == 15, timeout=30, interval=0.2)
        # A stop right after a reload (systemctl reload, then stop) stops cleanly, even
        # when it arrives while the process re-executes itself.
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: _holder(engine) is None, timeout=30, interval=0.05)
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, output
    assert "received SIGHUP, but not reloading" in output
    assert "restarting with the configuration read afresh" in output
    assert output.count("running 1 monitor(s)") >= 2
    assert "received SIGTERM" in output.rstrip().splitlines()[-1] + output[-300:]


def test_log_times_are_utc():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 0.0
    record.msecs = 0.0
    assert UtcFormatter("%(asctime)s").format(record) == "1970-01-01T00:00:00.000Z"


def test_skipped_run_warnings_are_rate_limited():
    now = [0.0]
    keep = SkippedRunFilter(clock=lambda: now[0])
    message = 'Execution of job "%s" skipped: maximum number of running instances reached (%d)'

    class Job:  # as APScheduler's: its str() carries the next run time
        def __init__(self, job_id: str) -> None:
            self.id, self.runs = job_id, 0

        def __str__(self) -> str:
            self.runs += 1
            return f"monitor {self.id} (next run at: 12:00:{self.runs:02d} UTC)"

    jobs = {"a": Job("a"), "b": Job("b")}

    def record(job: str) -> logging.LogRecord:
        return logging.LogRecord("apscheduler.scheduler", logging.WARNING, __file__, 1,
                                 message, (jobs[job], 1), None)

    assert keep.filter(record("a")) and keep.filter(record("b"))
    assert not any(keep.filter(record("a")) for _ in range(5))
    now[0] = SKIPPED_LOG_SECONDS + 1
    again = record("a")
    assert keep.filter(again) and "5 more since the last such warning" in again.getMessage()
    other = logging.LogRecord("apscheduler.scheduler", logging.WARNING, __file__, 1,
                              "something else", None, None)
    assert keep.filter(other)
