"""Leases on the database clock, and dead leaders taken over at once.

A "leader" here is a real process: a small script that claims the monitor's lease
with this package and is then killed with SIGKILL, so nothing is released.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import time

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import anomaly_monitor.tables as tables_module
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.tables import as_utc, batches, cursors
from anomaly_monitor.worker import Worker
from tests.faults.harness import start_daemon, write_config
from tests.helpers import (
    Sensors,
    insert_rows,
    monitor_settings,
    settings,
    trained_plant,
    wait_for,
)

#: Long enough that only a takeover "at once" can explain a successor's work.
LEASE_SECONDS = 120.0

LEADER = textwrap.dedent("""
    import sys, time
    from anomaly_monitor.db import create_engine
    from anomaly_monitor.identity import worker_identity
    from anomaly_monitor.cursors import claim
    url, seconds, host = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    owner = worker_identity()
    if host:  # pretend to run on another host: only the database can tell it is gone
        owner = host + owner[owner.index(":"):]
    engine = create_engine(url)
    with engine.begin() as connection:
        assert claim(connection, "plant", owner, seconds).lease is not None
    with engine.connect():  # hold a session open, as a working daemon does
        print(owner, flush=True)
        time.sleep(600)
""")


@pytest.fixture
def leaders():
    """Start processes holding the lease (``start(db_url, host, seconds)`` returns the
    process and its owner); whatever a test leaves running is killed after it."""
    started: list[subprocess.Popen[str]] = []

    def start(db_url: str, host: str = "", seconds: float = LEASE_SECONDS
              ) -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen([sys.executable, "-c", LEADER, db_url, str(seconds), host],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None
        owner = process.stdout.readline().strip()
        assert owner, "the leader process did not claim the lease"
        return process, owner

    yield start
    for process in started:
        kill(process)


def kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


@pytest.fixture
def plant(engine, db_url):
    sensors = Sensors()
    table, monitor, _, _ = trained_plant(
        engine, monitor_settings(lease_seconds=LEASE_SECONDS, interval_seconds=60.0),
        sensors=sensors)
    return engine, table, sensors, monitor


def new_worker(db_url, monitor, engine) -> Worker:
    return Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()), device="cpu")


def batch_rows(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.coalesce(sa.func.sum(batches.c.rows), 0))
                                      .where(batches.c.monitor == "plant")).scalar())


def lease_row(engine: sa.Engine) -> sa.Row:
    with engine.connect() as connection:
        return connection.execute(
            sa.select(cursors.c.lease_owner, cursors.c.lease_token, cursors.c.lease_expires_at)
            .where(cursors.c.monitor == "plant")).one()


def test_a_live_leader_is_waited_for_and_named(plant, db_url, caplog, leaders):
    engine, table, sensors, monitor = plant
    _, owner = leaders(db_url)
    insert_rows(engine, table, sensors.normal(10))
    standby = new_worker(db_url, monitor, engine)
    with caplog.at_level("INFO", logger="anomaly_monitor.worker"):
        for _ in range(3):
            assert standby.poll("plant").status == "standby"
    assert owner in standby.states["plant"].detail
    assert "until 20" in standby.states["plant"].detail
    waits = [r for r in caplog.records if "standing by" in r.getMessage()]
    assert len(waits) == 1 and owner in waits[0].getMessage()
    assert standby.states["plant"].rows == 0


def test_a_killed_leader_on_this_host_is_taken_over_at_once(plant, db_url, leaders):
    engine, table, sensors, monitor = plant
    leader, owner = leaders(db_url)
    assert lease_row(engine).lease_owner == owner
    kill(leader)
    insert_rows(engine, table, sensors.normal(25))
    started = time.monotonic()
    successor = new_worker(db_url, monitor, engine)
    state = successor.poll("plant")
    assert state.status == "running" and state.rows == 25
    assert time.monotonic() - started < LEASE_SECONDS / 4
    assert lease_row(engine).lease_owner == successor.owner


#: The cross-host test's lease and interval: a live leader renews at least every
#: max(interval, lease / 3) = 6.7 s, so one that has not for 10 s is overdue.
REMOTE_LEASE_SECONDS, REMOTE_INTERVAL_SECONDS = 20.0, 2.0


def test_a_leader_whose_sessions_are_gone_is_taken_over_on_postgresql(engine, db_url, leaders,
                                                                       caplog):
    """A leader "on another host" (its pid means nothing here) that has missed a renewal:
    while its session is open it is waited for; once it is killed PostgreSQL shows none
    of its sessions and the lease is taken before it expires. SQLite cannot know and
    waits for the lease to expire."""
    sensors = Sensors()
    table, monitor, _, _ = trained_plant(engine, monitor_settings(
        lease_seconds=REMOTE_LEASE_SECONDS, interval_seconds=REMOTE_INTERVAL_SECONDS),
        sensors=sensors)
    leader, owner = leaders(db_url, "elsewhere.example", REMOTE_LEASE_SECONDS)
    claimed = time.monotonic()
    successor = new_worker(db_url, monitor, engine)
    time.sleep(11.0)  # the leader (it never renews) is now overdue, but its session is open
    assert successor.poll("plant").status == "standby"
    kill(leader)
    insert_rows(engine, table, sensors.normal(15))
    with caplog.at_level("WARNING", logger="anomaly_monitor.worker"):
        if engine.dialect.name == "postgresql":
            while successor.poll("plant").status == "standby":  # the server notices at once
                assert time.monotonic() - claimed < REMOTE_LEASE_SECONDS - 1
                time.sleep(0.2)
            assert successor.states["plant"].rows == 15
            assert any("took the lease over from " + owner in r.getMessage()
                       for r in caplog.records)
        else:
            time.sleep(2.0)
            assert successor.poll("plant").status == "standby"
            assert lease_row(engine).lease_owner == owner


def database_now(engine: sa.Engine) -> dt.datetime:
    """The database server's clock."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            return connection.execute(sa.select(sa.func.now())).scalar()
        text = connection.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar()
    return as_utc(dt.datetime.fromisoformat(text))


def reader_processes(marker: str) -> list[int]:
    """Pids of SQLite reader children whose command line mentions ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().decode(errors="replace")
        except OSError:
            continue
        if "anomaly_monitor.reading.backends" in command and marker in command:
            found.append(int(entry))
    return found


class _ShiftedDatetime(dt.datetime):
    shift = dt.timedelta(0)

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        return dt.datetime.now(tz) + cls.shift


class _ShiftedClock:
    """Stands in for the ``datetime`` module inside ``anomaly_monitor.tables``."""

    UTC = dt.UTC
    timezone = dt.timezone
    timedelta = dt.timedelta
    datetime = _ShiftedDatetime


def test_workers_whose_clocks_differ_by_an_hour_agree_on_one_leader(plant, db_url,
                                                                    monkeypatch):
    engine, table, sensors, monitor = plant
    monkeypatch.setattr(tables_module, "dt", _ShiftedClock)
    workers = [new_worker(db_url, monitor, engine) for _ in range(2)]
    leaders = []
    for round_ in range(6):
        insert_rows(engine, table, sensors.normal(5))
        for i, worker in enumerate(workers):
            # Worker 0's clock runs an hour behind, worker 1's an hour ahead.
            _ShiftedDatetime.shift = dt.timedelta(hours=-1 if i == 0 else 1)
            if worker.poll("plant").status == "running":
                leaders.append((round_, i))
        row = lease_row(engine)
        # The lease runs out lease_seconds after the database's now, not a worker's.
        remaining = (as_utc(row.lease_expires_at) - database_now(engine)).total_seconds()
        assert 0 < remaining <= LEASE_SECONDS + 1
    assert {i for _, i in leaders} == {0}, leaders  # the first leader kept it throughout
    with engine.connect() as connection:
        counted = connection.execute(sa.select(sa.func.count(), sa.func.count(
            sa.distinct(batches.c.first_id))).where(batches.c.monitor == "plant")).one()
    assert counted[0] == counted[1]  # no batch committed twice
    assert workers[0].states["plant"].rows == 30


def test_kill_9_then_run_once_processes_the_whole_backlog(plant, db_url, tmp_path):
    """The issue's reproduction through the CLI: a daemon killed with SIGKILL, rows
    inserted, then ``run --once`` at once does the work instead of standing by."""
    engine, table, sensors, _ = plant
    config = write_config(tmp_path / "am.toml", db_url, lease=LEASE_SECONDS)
    log = tmp_path / "daemon.log"
    # Full batches of 40: after the first one the Arrow path reads (on SQLite through a
    # reader child process).
    insert_rows(engine, table, sensors.normal(400))
    daemon = start_daemon(config, log)
    try:
        wait_for(lambda: batch_rows(engine) >= 120, timeout=120)
        if engine.dialect.name == "sqlite":
            assert reader_processes(str(tmp_path)), "no SQLite reader child was started"
    finally:
        daemon.kill()
        daemon.wait(timeout=30)
    # Its SQLite reader child follows it, quietly.
    wait_for(lambda: not reader_processes(str(tmp_path)), timeout=10)
    insert_rows(engine, table, sensors.normal(40))
    started = time.monotonic()
    once = subprocess.run(
        [sys.executable, "-m", "anomaly_monitor", "--config", str(config), "run", "--once"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert once.returncode == 0, once.stderr
    assert "monitor plant: done" in once.stdout, once.stdout
    assert batch_rows(engine) == 440  # the whole backlog
    assert "took the lease over" in once.stderr
    assert time.monotonic() - started < LEASE_SECONDS / 2
    assert "Traceback" not in log.read_text()
