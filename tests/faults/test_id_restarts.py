"""Ids that restart under a running monitor (the table emptied, recreated, or truncated
with its sequence restarted): the monitor pauses loudly instead of skipping every new
row, and ``anomaly-monitor cursor`` moves the cursor so that they are all scored once."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from anomaly_monitor.cli import main
from anomaly_monitor.cursors import LeaseHeldError, read_cursor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.report import monitor_status, move_cursor
from anomaly_monitor.tables import anomalies, quarantine
from anomaly_monitor.worker import Worker
from tests.helpers import (
    Sensors,
    bulk_insert,
    insert_rows,
    monitor_settings,
    pause_info,
    rows_in_batches,
    settings,
    trained_plant,
)


def _restart_ids(engine: sa.Engine, table: sa.Table) -> None:
    """Empty the table and restart its ids, the way each database does it."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text(f"TRUNCATE {table.name} RESTART IDENTITY"))
        else:  # INTEGER PRIMARY KEY without AUTOINCREMENT: ids start again at 1
            connection.execute(table.delete())


@pytest.fixture
def running(engine, db_url):
    sensors = Sensors(seed=4)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(), sensors=sensors)
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    insert_rows(engine, table, sensors.anomalous(5))
    insert_rows(engine, table, sensors.normal(300))
    assert worker.poll("plant").status == "running"
    return engine, table, sensors, monitor, worker


def _restarts(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value(
        "anomaly_monitor_id_restarts_total", {"monitor": "plant"})


def test_ids_that_restart_pause_the_monitor_until_the_cursor_moves(running):
    engine, table, sensors, monitor, worker = running
    with engine.connect() as connection:
        before = read_cursor(connection, "plant")
        old_flags = connection.execute(sa.select(sa.func.count()).select_from(anomalies)).scalar()
    assert before.position > 400 and old_flags >= 5
    scored_before = rows_in_batches(engine)
    _restart_ids(engine, table)
    new_ids = insert_rows(engine, table, sensors.anomalous(5)) + \
        insert_rows(engine, table, sensors.normal(395))
    assert max(new_ids) < before.position

    state = worker.poll("plant")
    assert state.status == "paused" and "restarted" in state.detail
    assert f"cursor {monitor.name} --to-start" in state.detail
    assert _restarts(worker) == 1
    assert worker.metrics.registry.get_sample_value(
        "anomaly_monitor_paused", {"monitor": "plant"}) == 1
    assert [info["cause"] for info in pause_info(worker.metrics.registry, "plant")] == [
        "ids_restarted"]
    with engine.connect() as connection:
        status = monitor_status(connection, monitor)
    assert status["state"] == "paused" and status["pause_reason"].startswith("ids restarted")
    # It stays paused, without flapping or logging again, until the cursor moves.
    for _ in range(3):
        assert worker.poll("plant").status == "paused"
    assert _restarts(worker) == 1 and rows_in_batches(engine) == scored_before

    with engine.begin() as connection:
        moved = move_cursor(connection, monitor, "start")
    assert (moved["position"], moved["generation"], moved["resumed"]) == (0, 1, True)
    assert worker.poll("plant").status == "running"
    assert rows_in_batches(engine) - scored_before == 400  # every new row once
    with engine.connect() as connection:
        flagged = connection.execute(
            sa.select(anomalies.c.generation, sa.func.count()).group_by(anomalies.c.generation)
            .order_by(anomalies.c.generation)).all()
    # The old records are kept; the new rows' flags, with the same ids, beside them.
    assert flagged[0] == (0, old_flags) and flagged[1][0] == 1 and flagged[1][1] >= 5
    assert worker.poll("plant").status == "running"
    assert rows_in_batches(engine) - scored_before == 400


def test_a_table_refilled_past_the_cursor_is_noticed_by_the_row_at_the_cursor(running):
    engine, table, sensors, _, worker = running
    with engine.connect() as connection:
        position = read_cursor(connection, "plant").position
    _restart_ids(engine, table)
    bulk_insert(engine, table, sensors.normal(position + 50))  # ids pass the old cursor
    state = worker.poll("plant")
    assert state.status == "paused" and f"row at the cursor (id {position})" in state.detail
    assert _restarts(worker) == 1


def test_rows_quarantined_after_a_reset_are_kept_apart_from_the_old_ones(running):
    engine, table, sensors, monitor, worker = running
    broken = [list(r) for r in sensors.normal(3)]
    broken[1][0] = None
    insert_rows(engine, table, broken)
    assert worker.poll("plant").status == "running"
    _restart_ids(engine, table)
    insert_rows(engine, table, broken)  # the same ids again, one of them broken again
    assert worker.poll("plant").status == "paused"
    with engine.begin() as connection:
        move_cursor(connection, monitor, "start")
    assert worker.poll("plant").status == "running"
    with engine.connect() as connection:
        rows = connection.execute(sa.select(quarantine.c.generation, quarantine.c.source_id)
                                  .order_by(quarantine.c.generation)).all()
    assert [g for g, _ in rows] == [0, 1] and rows[1][1] == 2


def test_the_cursor_is_not_moved_under_a_live_worker_unless_forced(running):
    engine, table, sensors, monitor, worker = running
    assert worker.states["plant"].lease is not None  # it leads, and is alive
    with pytest.raises(LeaseHeldError, match="is scoring it"), engine.begin() as connection:
        move_cursor(connection, monitor, 0)
    with engine.begin() as connection:
        moved = move_cursor(connection, monitor, "end", force=True)
    assert moved["lease_taken_from"] == worker.owner
    insert_rows(engine, table, sensors.normal(10))
    # The old leader's next poll finds its lease gone, claims it again and scores on.
    state = worker.poll("plant")
    state = worker.poll("plant") if state.status == "standby" else state
    assert state.status == "running"


def test_the_cursor_command(running, tmp_path):
    engine, _, _, monitor, worker = running
    worker.release_leases()
    path = tmp_path / "am.toml"
    path.write_text(f'[database]\nurl = "{engine.url.render_as_string(hide_password=False)}"\n'
                    '[[monitor]]\nname = "plant"\ntable = "readings"\ntimestamp_column = "ts"\n'
                    f'features = {list(monitor.features)!r}\n'.replace("'", '"'))

    def cli(*args: str, expect: int = 0) -> str:
        result = CliRunner().invoke(main, ["--config", str(path), "cursor", *args])
        assert result.exit_code == expect, result.output
        assert "Traceback" not in result.output
        return result.output

    with engine.connect() as connection:
        position = read_cursor(connection, "plant").position
    assert f"cursor {position} (generation 0)" in cli("plant")
    assert "conflict" in cli("plant", "--to-start", "--to-end", expect=2)
    assert "--force needs" in cli("plant", "--force", expect=2)
    out = cli("plant", "--reset-to", str(position - 100))
    assert f"moved from {position} to {position - 100}" in out and "generation 0 -> 1" in out
    assert "100 row(s) after the cursor" in out
    assert "moved from" in cli("plant", "--reset-to", str(position))  # forward: same generation
    assert "past the newest id" in cli("plant", "--reset-to", str(position + 10**6), expect=1)
    assert "(generation 1)" in cli("plant")
    assert "nosuch" in cli("nosuch", expect=2)


def test_a_restart_pause_stays_when_the_refill_passes_the_old_cursor(running):
    engine, table, sensors, _, worker = running
    with engine.connect() as connection:
        position = read_cursor(connection, "plant").position
    _restart_ids(engine, table)
    insert_rows(engine, table, sensors.normal(10))
    assert worker.poll("plant").status == "paused"
    bulk_insert(engine, table, sensors.normal(position + 20))  # ids pass the old cursor
    for _ in range(2):
        state = worker.poll("plant")
        assert state.status == "paused" and state.detail.startswith("ids restarted")
    assert _restarts(worker) == 1  # logged and counted once


def test_a_reset_fences_out_a_batch_read_before_it(running):
    from anomaly_monitor.batch import run_batch
    from anomaly_monitor.cursors import BatchConflictError
    from anomaly_monitor.registry import ModelCache
    from anomaly_monitor.source import reflect_source

    engine, table, sensors, monitor, worker = running
    lease = worker.states["plant"].lease
    assert lease is not None
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE am_cursors SET paused = :p, pause_reason = 'x'"),
                           {"p": True})
        move_cursor(connection, monitor, "start")  # paused: allowed without --force
    insert_rows(engine, table, sensors.normal(3))
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    with pytest.raises(BatchConflictError):  # the old tenure's token no longer holds
        run_batch(engine, monitor, source, ModelCache("cpu"), lease=lease)
