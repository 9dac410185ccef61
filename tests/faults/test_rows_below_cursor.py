"""Rows written below the cursor (a backfill with old ids, negative ids): counted and
shown (status, a metric, a warning), and scored once by ``anomaly-monitor backfill``,
however often it runs, without repeating a row a batch already read."""

from __future__ import annotations

import datetime as dt
import json
import logging

import sqlalchemy as sa
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from anomaly_monitor.cli import main
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.tables import anomalies, batches, quarantine
from anomaly_monitor.worker import Worker
from tests.helpers import (
    FEATURES,
    Sensors,
    daemon_config,
    insert_rows,
    monitor_settings,
    rows_in_batches,
    settings,
    trained_plant,
)


def _insert_with_ids(engine: sa.Engine, table: sa.Table, ids: list[int], values) -> None:
    stamp = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    with engine.begin() as connection:
        connection.execute(table.insert(), [
            {"id": i, "ts": stamp, **{f: float(v) for f, v in zip(FEATURES, row, strict=True)}}
            for i, row in zip(ids, values, strict=True)])


def _cli(tmp_path, engine, *args: str, expect: int = 0) -> str:
    config = tmp_path / "am.toml"
    config.write_text(daemon_config(engine, FEATURES, 1.0))
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    assert result.exit_code == expect, result.output
    assert "Traceback" not in result.output
    return result.output


def test_rows_below_the_cursor_are_counted_then_backfilled_once(engine, tmp_path, caplog):
    sensors = Sensors(seed=21)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(batch_size=50),
                                         sensors=sensors)
    worker = Worker(settings(engine.url.render_as_string(hide_password=False), monitor),
                    engine, Metrics(CollectorRegistry()), device="cpu")
    insert_rows(engine, table, sensors.normal(120))
    worker.poll("plant")
    # A backfill below the cursor: negative ids, and anomalous ones among them.
    below = list(range(-30, 0))
    _insert_with_ids(engine, table, below[:25], sensors.normal(25))
    _insert_with_ids(engine, table, below[25:], sensors.anomalous(5))
    insert_rows(engine, table, sensors.normal(10))
    worker.runners["plant"].state.below_check_at = 0.0  # the next poll counts now
    with caplog.at_level(logging.WARNING, logger="anomaly_monitor"):
        state = worker.poll("plant")
    assert state.rows == 130
    assert "at least 30 row(s) were written below the cursor" in caplog.text
    registry = worker.metrics.registry
    assert registry.get_sample_value("anomaly_monitor_rows_below_cursor",
                                     {"monitor": "plant"}) == 30
    status = json.loads(_cli(tmp_path, engine, "status", "--json"))["monitors"][0]
    assert status["rows_below_cursor"] == 30
    assert "at least 30 row(s) were written below the cursor" in _cli(tmp_path, engine,
                                                                      "status")
    # Moving the cursor forward (skipping rows) or nowhere does not hide them.
    skipped = insert_rows(engine, table, sensors.normal(7))
    _cli(tmp_path, engine, "cursor", "plant", "--to-end", "--force")
    _cli(tmp_path, engine, "cursor", "plant", "--reset-to", str(skipped[-1]), "--force")
    worker.runners["plant"].state.below_check_at = 0.0
    insert_rows(engine, table, sensors.normal(3))
    worker.poll("plant")
    assert registry.get_sample_value("anomaly_monitor_rows_below_cursor",
                                     {"monitor": "plant"}) == 30

    out = _cli(tmp_path, engine, "backfill", "plant", "--from-id", "-1000", "--to-id", "0")
    assert "30 row(s) scored" in out
    status = json.loads(_cli(tmp_path, engine, "status", "--json"))["monitors"][0]
    assert status["rows_below_cursor"] == 0  # at once, not at the next count
    with engine.connect() as connection:
        flagged = connection.execute(sa.select(anomalies.c.source_id)).scalars().all()
    assert len(flagged) == len(set(flagged))
    assert sum(1 for i in flagged if i < 0) >= 4  # the anomalous backfilled rows
    assert rows_in_batches(engine) == 163  # every row read once (the 7 skipped: none)
    again = json.loads(_cli(tmp_path, engine, "backfill", "plant", "--from-id", "-1000",
                            "--to-id", "0", "--json"))
    assert again["rows"] == 0 and again["skipped"] == 30 and rows_in_batches(engine) == 163
    # Over the whole table: the 133 rows batches read are skipped; what no batch read,
    # the 600 rows of history before the monitor started and the 7 skipped by --to-end,
    # is scored.
    whole = json.loads(_cli(tmp_path, engine, "backfill", "plant", "--from-id", "-1000",
                            "--to-id", str(10**6), "--json"))
    assert whole["rows"] == 607 and rows_in_batches(engine) == 770
    with engine.connect() as connection:
        kinds = dict(connection.execute(sa.select(batches.c.kind, sa.func.sum(batches.c.rows))
                                        .group_by(batches.c.kind)).all())
        flagged = connection.execute(sa.select(anomalies.c.source_id)).scalars().all()
    assert kinds["backfill"] == 637 and len(flagged) == len(set(flagged))
    worker.runners["plant"].state.below_check_at = 0.0
    worker.poll("plant")
    assert registry.get_sample_value("anomaly_monitor_rows_below_cursor",
                                     {"monitor": "plant"}) == 0


def test_a_backfill_skips_rows_read_and_scores_ids_in_closed_gaps(engine, tmp_path):
    sensors = Sensors(seed=22)
    table, monitor, _, _ = trained_plant(engine, monitor_settings(batch_size=500),
                                         sensors=sensors)
    worker = Worker(settings(engine.url.render_as_string(hide_password=False), monitor),
                    engine, Metrics(CollectorRegistry()), device="cpu")
    start = 10_000
    present = [start + 2 * k for k in range(40)]  # every other id: 39 gaps
    _insert_with_ids(engine, table, present, sensors.normal(40))
    worker.poll("plant")
    with engine.begin() as connection:  # the gaps expired (as after an hour)
        connection.execute(batches.update().values(open_gaps=None))
    filled = [i + 1 for i in present[:10]]
    _insert_with_ids(engine, table, filled, sensors.normal(10))
    before = rows_in_batches(engine)
    out = _cli(tmp_path, engine, "backfill", "plant", "--from-id", str(start),
               "--to-id", str(present[-1]))
    assert "10 row(s) scored" in out and rows_in_batches(engine) == before + 10
    # Ranges above the cursor are the worker's; a reversed range is refused.
    out = _cli(tmp_path, engine, "backfill", "plant", "--from-id", str(present[-1] + 1),
               "--to-id", str(present[-1] + 100), expect=2)
    assert "above the cursor" in out
    out = _cli(tmp_path, engine, "backfill", "plant", "--from-id", str(start),
               "--to-id", str(present[-1] + 100))
    assert f"ids {present[-1] + 1}..{present[-1] + 100} are above the cursor" in out
    assert "0 row(s) scored" in out and "row(s) skipped" in out
    out = _cli(tmp_path, engine, "backfill", "plant", "--from-id", "-1" + "0" * 20,
               "--to-id", "1", expect=2)
    assert "--from-id" in out
    out = _cli(tmp_path, engine, "backfill", "plant", "--from-id", "5", "--to-id", "1",
               expect=2)
    assert "--from-id 5 is above --to-id 1" in out
    out = _cli(tmp_path, engine, "backfill", "nosuch", "--from-id", "1", "--to-id", "2",
               expect=2)
    assert "nosuch" in out
    with engine.connect() as connection:
        keys = connection.execute(sa.select(quarantine.c.source_id)).scalars().all()
    assert len(keys) == len(set(keys))
