"""The wall clock stepping back under the running daemon (an NTP correction), made with
libfaketime (Debian's ``faketime``): polls go on at the interval instead of stopping
for the length of the step, and the step is logged.

libfaketime moves the wall clock only (``FAKETIME_DONT_FAKE_MONOTONIC``), as NTP does;
the offset is read from a file at every call, so the test steps it while the daemon
runs.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    Sensors,
    daemon_config,
    insert_rows,
    monitor_settings,
    rows_in_batches,
    trained_plant,
    wait_for,
)

LIBRARIES = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
STEP_SECONDS = 600
INTERVAL_SECONDS = 1


@pytest.fixture
def libfaketime():
    if not LIBRARIES:
        if os.environ.get("CI"):
            pytest.fail("libfaketime is not installed (apt-get install faketime)")
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    return LIBRARIES[0]


def test_polls_go_on_when_the_wall_clock_steps_back(engine, tmp_path, libfaketime):
    sensors = Sensors(seed=8)
    table, monitor, _, _ = trained_plant(
        engine, monitor_settings(interval_seconds=INTERVAL_SECONDS), sensors=sensors)
    config = tmp_path / "am.toml"
    config.write_text(daemon_config(engine, monitor.features, INTERVAL_SECONDS))
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LD_PRELOAD": libfaketime,
           "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "anomaly_monitor", "--config", str(config), "run",
         "--reader", "plain"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env)
    try:
        insert_rows(engine, table, sensors.normal(10))
        wait_for(lambda: rows_in_batches(engine) == 10, timeout=60, interval=0.2)
        offset.write_text(f"-{STEP_SECONDS}\n")
        time.sleep(2)  # the step has happened; the daemon notices it within a second
        insert_rows(engine, table, sensors.normal(10))
        # Without the guard, the scheduler waits out the step: no batch for 600 s.
        waited = wait_for(lambda: rows_in_batches(engine) == 20, timeout=15, interval=0.2)
        assert waited < 5 * INTERVAL_SECONDS + 2
        insert_rows(engine, table, sensors.normal(10))  # and the interval holds after it
        wait_for(lambda: rows_in_batches(engine) == 30, timeout=10, interval=0.2)
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=20)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, output
    assert f"the wall clock stepped back by {STEP_SECONDS} s" in output, output
