"""One active worker per monitor: a standby takes over from a dead leader, and a leader
paused past its lease cannot commit when it wakes up."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from anomaly_monitor.batch import run_batch
from anomaly_monitor.cli import main
from anomaly_monitor.cursors import BatchConflictError, note_standby
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import ModelCache
from anomaly_monitor.report import monitor_status
from anomaly_monitor.source import reflect_source
from anomaly_monitor.tables import anomalies, batches, standbys
from anomaly_monitor.worker import Worker
from tests.helpers import (
    FEATURES,
    Sensors,
    daemon_config,
    insert_rows,
    monitor_settings,
    pause_info,
    settings,
    trained_plant,
)

LEASE_SECONDS = 1.0


@pytest.fixture
def two(engine, db_url):
    sensors = Sensors()
    table, monitor, _, _ = trained_plant(engine, monitor_settings(lease_seconds=LEASE_SECONDS),
                                         sensors=sensors)
    workers = [Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                      device="cpu") for _ in range(2)]
    return engine, table, sensors, monitor, workers


def test_a_standby_takes_over_when_the_leader_dies(two):
    engine, table, sensors, _, (leader, standby) = two
    insert_rows(engine, table, sensors.normal(10))
    before_renewal = time.monotonic()
    assert leader.poll("plant").status == "running"
    assert standby.poll("plant").status == "standby"
    assert leader.owner in standby.states["plant"].detail
    # Standing by is healthy: the standby's series must not look stalled.
    last = standby.metrics.registry.get_sample_value(
        "anomaly_monitor_last_success_timestamp_seconds", {"monitor": "plant"})
    assert time.time() - last < 5
    insert_rows(engine, table, sensors.normal(10))
    # The leader dies without releasing its lease: the standby waits for it to expire.
    started = time.monotonic()
    while standby.poll("plant").status == "standby":
        assert time.monotonic() - started < LEASE_SECONDS + 5
        time.sleep(0.1)
    # Not before the lease ran out (counted from before the leader's last renewal, so
    # that a slow machine's setup time does not shorten the wait the test expects).
    assert time.monotonic() - before_renewal >= LEASE_SECONDS * 0.5
    assert standby.states["plant"].rows == 10
    assert leader.poll("plant").status == "standby"


def _status(engine, monitor):
    with engine.connect() as connection:
        return monitor_status(connection, monitor)


def test_status_shows_the_lease_holder_and_the_standbys(two, tmp_path):
    engine, _, _, monitor, (leader, standby) = two
    assert leader.poll("plant").status == "running"
    assert standby.poll("plant").status == "standby"
    status = _status(engine, monitor)
    assert status["lease"]["owner"] == leader.owner
    assert [w["owner"] for w in status["standbys"]] == [standby.owner]
    assert 0 <= status["standbys"][0]["seconds_ago"] < 5
    config = tmp_path / "am.toml"
    config.write_text(daemon_config(engine, FEATURES, 1.0))
    out = CliRunner().invoke(main, ["--config", str(config), "status"]).output
    assert f"monitor plant: standing by: {standby.owner} (seen " in out
    assert f"by {leader.owner}" in out
    # A stopped standby is no longer listed; one that takes the lease is the holder.
    standby.release_leases()
    assert _status(engine, monitor)["standbys"] == []
    assert standby.poll("plant").status == "standby"
    leader.release_leases()
    assert standby.poll("plant").status == "running"
    assert leader.poll("plant").status == "standby"
    status = _status(engine, monitor)
    assert status["lease"]["owner"] == standby.owner
    assert [w["owner"] for w in status["standbys"]] == [leader.owner]


def test_a_paused_leader_that_becomes_a_standby_no_longer_reports_the_pause(two):
    engine, _, _, _, (leader, standby) = two
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE readings RENAME TO readings_away"))
    assert leader.poll("plant").status == "paused"
    assert pause_info(leader.metrics.registry, "plant")[0]["cause"] == "schema"
    leader.release_leases()
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE readings_away RENAME TO readings"))
    assert standby.poll("plant").status == "running"  # re-checked, resumed
    assert leader.poll("plant").status == "standby"
    registry = leader.metrics.registry
    assert registry.get_sample_value("anomaly_monitor_paused", {"monitor": "plant"}) == 0
    assert pause_info(registry, "plant") == []  # the leader reports the monitor now


def test_standby_rows_of_dead_workers_are_forgotten(two):
    engine = two[0]
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with engine.begin() as connection:
        connection.execute(standbys.insert().values(monitor="plant", owner="gone:1",
                                                    seen_at=long_ago))
        note_standby(connection, "plant", "alive:2", forget_after=600)
        owners = connection.execute(sa.select(standbys.c.owner)).scalars().all()
    assert owners == ["alive:2"]


def test_a_clean_stop_hands_over_at_once(two):
    engine, table, sensors, _, (leader, standby) = two
    leader.poll("plant")
    leader.release_leases()
    insert_rows(engine, table, sensors.normal(5))
    assert standby.poll("plant").status == "running"
    assert standby.states["plant"].rows == 5


def test_a_paused_leader_cannot_commit_after_its_lease_was_taken(two):
    engine, table, sensors, monitor, (leader, standby) = two
    leader.poll("plant")
    stale_lease = leader.states["plant"].lease
    insert_rows(engine, table, sensors.anomalous(5))
    time.sleep(LEASE_SECONDS + 0.2)  # the leader is "paused" (GC, SIGSTOP, a slow disk...)
    assert standby.poll("plant").status == "running"
    insert_rows(engine, table, sensors.anomalous(5))
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
        before = connection.execute(sa.select(sa.func.count()).select_from(batches)).scalar()
    # The old leader wakes up mid-batch with its old token: its commit is fenced out.
    with pytest.raises(BatchConflictError, match=r"lease .* was taken over by"):
        run_batch(engine, monitor, source, ModelCache("cpu"), lease=stale_lease)
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(batches)).scalar() \
            == before
        flagged = connection.execute(sa.select(anomalies.c.source_id)).scalars().all()
    assert len(flagged) == len(set(flagged)) >= 5
    assert leader.poll("plant").status == "standby"
