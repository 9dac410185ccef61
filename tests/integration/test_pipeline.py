"""train -> run_batch -> am_ tables, on a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import itertools
import logging

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor import runner as runner_module
from anomaly_monitor.batch import run_batch
from anomaly_monitor.calibration_plan import apply_calibration, plan_calibration
from anomaly_monitor.config import ThresholdSettings
from anomaly_monitor.cursors import BatchConflictError, read_cursor
from anomaly_monitor.lifecycle import activate_checked, rollback, train_monitor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import (
    ModelCache,
    RegistryError,
    active_version,
    get_version,
    list_versions,
)
from anomaly_monitor.source import SchemaError, reflect_source
from anomaly_monitor.tables import anomalies, batches, model_versions, quarantine
from anomaly_monitor.worker import Worker
from tests.helpers import (
    Sensors,
    bulk_insert,
    drain,
    insert_rows,
    monitor_settings,
    pause_info,
    settings,
    source_table,
    trained_plant,
)

TRAINING_ROWS = 1500


@pytest.fixture
def plant(engine):
    """A source table with history, a trained and activated model, and the simulator."""
    sensors = Sensors()
    table, monitor, _, report = trained_plant(engine, sensors=sensors, rows=TRAINING_ROWS)
    return engine, table, monitor, sensors, report


def fetch(engine, query):
    with engine.connect() as connection:
        return connection.execute(query).all()


def test_train_stores_and_activates_a_version(plant):
    engine, _, monitor, _, report = plant
    version = report.version
    assert version.version == 1 and version.status == "active"
    assert version.training["holdout_rows"] == pytest.approx(0.2 * TRAINING_ROWS, abs=1)
    assert version.features == list(monitor.features)
    assert 0.0 < version.validation["holdout_flag_rate"] <= 0.02
    # What the anomaly-rate alert compares with: about the calibrated 1%.
    assert version.expected_ratio() == pytest.approx(0.01, abs=0.006)
    with engine.connect() as connection:
        assert read_cursor(connection, "plant").position == TRAINING_ROWS
        assert [v.version for v in list_versions(connection, "plant")] == [1]


def test_batch_flags_anomalies_quarantines_bad_rows_and_advances_cursor(plant):
    engine, table, monitor, sensors, _ = plant
    normal_ids = insert_rows(engine, table, sensors.normal(300))
    anomaly_ids = insert_rows(engine, table, sensors.anomalous(20), label=1)
    bad = [[None, 1, 1, 1, 1, 1], [1, 1, float("inf"), 1, 1, 1], [1, None, None, 1, 1, 1]]
    bad_ids = insert_rows(engine, table, bad)
    results = drain(engine, monitor)
    flagged = {r.source_id for r in fetch(engine, sa.select(anomalies.c.source_id))}
    assert len(flagged & set(anomaly_ids)) >= 18
    assert len(flagged & set(normal_ids)) <= 12
    reasons = dict(fetch(engine, sa.select(quarantine.c.source_id, quarantine.c.reason)))
    assert set(reasons) == set(bad_ids)
    assert reasons[bad_ids[0]] == "null"
    assert reasons[bad_ids[1]] in ("infinite", "null")  # SQLite stores inf; drivers vary
    with engine.connect() as connection:
        assert read_cursor(connection, "plant").position == bad_ids[-1]
    records = fetch(engine, sa.select(batches).order_by(batches.c.first_id))
    assert sum(r.rows for r in records) == 323 == sum(r.rows for r in results)
    assert sum(r.quarantined for r in records) == 3
    assert sum(r.flagged for r in records) == len(flagged)
    row = fetch(engine, sa.select(anomalies).where(anomalies.c.source_id == anomaly_ids[0]))[0]
    assert 0 <= row.severity <= 100 and row.score > row.threshold and row.model_version == 1
    shares = [c["share"] for c in row.contributions]
    assert len(shares) == 3 and shares == sorted(shares, reverse=True)
    assert {c["feature"] for c in row.contributions} <= set(monitor.features)


def test_every_row_is_scored_once_in_contiguous_batches(plant):
    engine, table, _, sensors, _ = plant
    monitor = monitor_settings(batch_size=70)
    ids = insert_rows(engine, table, sensors.normal(200))
    assert len(drain(engine, monitor)) == 3
    assert drain(engine, monitor) == []
    ranges = [(r.first_id, r.last_id, r.rows) for r in fetch(
        engine, sa.select(batches).order_by(batches.c.first_id))]
    assert ranges[0][0] == ids[0] and ranges[-1][1] == ids[-1]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    assert sum(r[2] for r in ranges) == 200


def test_a_moved_cursor_rolls_the_whole_batch_back(plant):
    engine, table, monitor, sensors, _ = plant
    insert_rows(engine, table, sensors.anomalous(5))

    class MovingCache(ModelCache):
        def model(self, connection, version):
            model = super().model(connection, version)
            with engine.begin() as other:
                other.execute(sa.text("UPDATE am_cursors SET position = position + 1"))
            return model

    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    with pytest.raises(BatchConflictError):
        run_batch(engine, monitor, source, MovingCache("cpu"))
    assert fetch(engine, sa.select(anomalies)) == []
    assert fetch(engine, sa.select(batches)) == []


def test_query_delay_leaves_young_rows_for_later(plant):
    engine, table, _, sensors, _ = plant
    now = dt.datetime.now(dt.UTC)
    old = insert_rows(engine, table, sensors.normal(5), start=now - dt.timedelta(hours=2))
    insert_rows(engine, table, sensors.normal(5), start=now)
    monitor = monitor_settings(query_delay_seconds=600)
    results = drain(engine, monitor)
    assert sum(r.rows for r in results) == 5
    with engine.connect() as connection:
        assert read_cursor(connection, "plant").position == old[-1]


def test_a_new_active_version_is_used_without_restart_and_can_be_rolled_back(plant):
    engine, table, monitor, sensors, _ = plant
    models = ModelCache("cpu")
    insert_rows(engine, table, sensors.normal(10))
    assert drain(engine, monitor, models)[0].model_version == 1
    report = train_monitor(engine, monitor, device="cpu", activate_version=False)
    assert report.version.status == "shadow"  # a challenger beside version 1
    with engine.begin() as connection:
        activate_checked(connection, monitor, None, 2)
    insert_rows(engine, table, sensors.normal(10))
    assert drain(engine, monitor, models)[0].model_version == 2
    with engine.begin() as connection:
        assert rollback(connection, monitor).version == 1
        assert active_version(connection, "plant") == 1
        statuses = dict(connection.execute(
            sa.select(model_versions.c.version, model_versions.c.status)).all())
    assert statuses == {1: "active", 2: "retired"}
    with pytest.raises(RegistryError, match="nothing to roll back to"), \
            engine.begin() as connection:
        rollback(connection, monitor)  # never forward again to the abandoned version 2


def test_a_tampered_artifact_is_refused_and_the_active_version_stays(plant):
    engine, _, monitor, _, _ = plant
    train_monitor(engine, monitor, device="cpu", activate_version=False)
    with engine.begin() as connection:
        blob = bytearray(connection.execute(sa.select(model_versions.c.artifact).where(
            model_versions.c.version == 2)).scalar())
        blob[-1] ^= 0xFF
        connection.execute(model_versions.update().where(model_versions.c.version == 2)
                           .values(artifact=bytes(blob)))
    with pytest.raises(RegistryError, match="sha256"), engine.begin() as connection:
        activate_checked(connection, monitor, None, 2)
    with engine.connect() as connection:
        assert active_version(connection, "plant") == 1


@pytest.mark.parametrize(("overrides", "message"), [
    ({"table": "nope"}, "table 'nope' does not exist"),
    ({"features": ("f0", "missing")}, "column 'missing' is missing"),
    ({"features": ("f0", "note")}, "'note' .* not a numeric type"),
    ({"id_column": "ts"}, "id_column 'ts' has type"),
    ({"timestamp_column": "when"}, "timestamp_column 'when' is not a column"),
])
def test_schema_problems_name_the_table_or_column(engine, overrides, message):
    source_table(engine)
    with pytest.raises(SchemaError, match=message), engine.connect() as connection:
        reflect_source(connection, monitor_settings(**overrides))


def test_worker_pauses_a_broken_monitor_and_keeps_the_others(plant, db_url):
    engine, table, monitor, sensors, _ = plant
    insert_rows(engine, table, sensors.normal(20))
    broken = monitor_settings(name="broken", table="missing_table")
    registry = CollectorRegistry()
    with engine.begin() as connection:  # the broken monitor has a cursor, as if it once worked
        connection.execute(sa.text(
            "INSERT INTO am_cursors (monitor, position, paused, updated_at) "
            "VALUES ('broken', 0, false, CURRENT_TIMESTAMP)"))
    worker = Worker(settings(db_url, monitor, broken), engine, Metrics(registry), device="cpu")
    assert worker.poll("broken").status == "paused"
    assert "missing_table" in worker.states["broken"].detail
    assert worker.poll("plant").status == "running"
    assert registry.get_sample_value("anomaly_monitor_rows_scored_total",
                                     {"monitor": "plant"}) == 20
    assert registry.get_sample_value("anomaly_monitor_paused", {"monitor": "broken"}) == 1
    # The cause and reason are a label of the one pause_info series, for the alert.
    info = pause_info(registry, "broken")
    assert len(info) == 1 and info[0]["cause"] == "schema"
    assert "missing_table" in info[0]["reason"]
    assert pause_info(registry, "plant") == []
    assert registry.get_sample_value("anomaly_monitor_backlog_rows", {"monitor": "plant"}) == 0
    assert registry.get_sample_value("anomaly_monitor_model_info",
                                     {"monitor": "plant", "version": "1", "kind": "dae"}) == 1
    with engine.connect() as connection:
        assert read_cursor(connection, "broken").pause_reason.startswith("monitor 'broken'")


def test_metrics_series_exist_at_zero_before_any_batch(engine, db_url):
    registry = CollectorRegistry()
    Worker(settings(db_url), engine, Metrics(registry), device="cpu")
    for name, labels in [
        ("anomaly_monitor_rows_scored_total", {}),
        ("anomaly_monitor_rows_quarantined_total", {"reason": "null"}),
        ("anomaly_monitor_batches_total", {"outcome": "error"}),
        ("anomaly_monitor_batch_duration_seconds_count", {}),
        ("anomaly_monitor_severity_count", {}),
        ("anomaly_monitor_late_rows_total", {}),
        ("anomaly_monitor_backlog_rows", {}),
        ("anomaly_monitor_expected_anomaly_ratio", {}),
    ]:
        assert registry.get_sample_value(name, {"monitor": "plant", **labels}) == 0
    assert registry.get_sample_value("anomaly_monitor_interval_seconds",
                                     {"monitor": "plant"}) == 1.0


def test_a_database_error_is_counted_and_backed_off_not_raised(plant, db_url):
    engine, table, _, sensors, _ = plant
    insert_rows(engine, table, sensors.normal(5))
    registry = CollectorRegistry()
    worker = Worker(settings(db_url), engine, Metrics(registry), device="cpu")
    with engine.begin() as connection:  # a failure the database reports mid-pipeline
        connection.execute(sa.text("DROP TABLE am_batches"))
    state = worker.poll("plant", budget_seconds=0.5)
    assert state.status == "error" and state.failures >= 1
    assert registry.get_sample_value("anomaly_monitor_batches_total",
                                     {"monitor": "plant", "outcome": "error"}) >= 1
    assert np.isclose(registry.get_sample_value(
        "anomaly_monitor_rows_scored_total", {"monitor": "plant"}), 0)


def test_a_model_for_another_feature_set_pauses_the_monitor_until_fixed(plant, db_url):
    engine, table, monitor, sensors, _ = plant
    insert_rows(engine, table, sensors.normal(5))
    changed = monitor_settings(features=("f0", "f1", "f2"))
    worker = Worker(settings(db_url, changed), engine, Metrics(CollectorRegistry()),
                    device="cpu")
    assert worker.poll("plant").status == "paused"
    assert "trained on features" in worker.states["plant"].detail
    assert "anomaly-monitor train plant" in worker.states["plant"].detail
    worker.release_leases()  # the first process stops cleanly
    fixed = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()),
                   device="cpu")
    assert fixed.poll("plant").status == "running"
    assert fixed.states["plant"].rows == 5


def test_labels_calibration_uses_the_held_out_labels(engine):
    table = source_table(engine)
    sensors = Sensors(seed=3)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    bulk_insert(engine, table, sensors.normal(1300), start=start)
    anomaly_ids = insert_rows(engine, table, sensors.anomalous(30), label=1,
                              start=start + dt.timedelta(days=1))
    bulk_insert(engine, table, sensors.normal(170), start=start + dt.timedelta(days=1, hours=1))
    monitor = monitor_settings(label_column="label")
    report = train_monitor(engine, monitor, device="cpu")
    assert report.version.validation["auroc"] > 0.95
    plan = plan_calibration(engine, monitor, ThresholdSettings(method="labels"))
    assert plan.chosen.method == "labels"
    scores = dict(fetch(engine, sa.select(table.c.id, table.c.label)))
    assert sum(scores[i] for i in anomaly_ids) == 30
    flagged_rate = float((plan.holdout_scores > plan.chosen.value).mean())
    assert 0.05 < flagged_rate < 0.2  # about the 30 anomalies among 300 held-out rows
    # A plan made before another calibrate (or an activation) changed the version is
    # refused in the update itself, not applied over the newer threshold.
    stale = plan_calibration(engine, monitor, ThresholdSettings(method="quantile"))
    apply_calibration(engine, monitor, plan)
    with engine.connect() as connection:
        assert get_version(connection, "plant", 1).threshold_method == "labels"
    with pytest.raises(RegistryError, match="changed during calibration"):
        apply_calibration(engine, monitor, stale)
    with engine.connect() as connection:
        assert get_version(connection, "plant", 1).threshold_method == "labels"


def test_run_once_gives_up_after_repeated_failures_instead_of_hanging(plant, db_url):
    engine, table, _, sensors, _ = plant
    insert_rows(engine, table, sensors.normal(5))
    worker = Worker(settings(db_url), engine, Metrics(CollectorRegistry()), device="cpu")
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE am_quarantine"))
    insert_rows(engine, table, [[None] * 6])
    states = worker.run_once()
    assert states["plant"].status in ("error", "paused")
    assert states["plant"].failures >= 3


def test_a_monitor_paused_by_repeated_failures_retries_quietly_with_one_series(
        plant, db_url, monkeypatch, caplog):
    engine, table, _, sensors, _ = plant
    insert_rows(engine, table, sensors.normal(5))
    worker = Worker(settings(db_url), engine, Metrics(CollectorRegistry()), device="cpu")
    real_run_batch = runner_module.run_batch

    def broken(*args, **kwargs):
        raise ValueError("the batch breaks")

    monkeypatch.setattr(runner_module, "run_batch", broken)
    state = worker.runners["plant"].state
    with caplog.at_level(logging.INFO, logger="anomaly_monitor.worker"):
        for _ in range(12):  # the pause, then a retry at every poll
            state.retry_at = 0.0
            worker.poll("plant", budget_seconds=float("inf"))
    assert state.status == "paused" and state.detail.startswith("repeated failures")
    registry = worker.metrics.registry
    [info] = pause_info(registry, "plant")  # one series, however many retries
    assert info["cause"] == "repeated_failures" and "the batch breaks" in info["reason"]
    paused_lines = [r for r in caplog.records if r.getMessage().startswith("monitor plant paused")]
    assert len(paused_lines) == 1 and paused_lines[0].levelno == logging.ERROR
    retries = [r for r in caplog.records if "trying a batch again" in r.getMessage()]
    assert len(retries) == 1  # logged the first time only
    tracebacks = [r for r in caplog.records if r.getMessage().endswith("unexpected error")]
    assert len(tracebacks) == 5  # the failures that led to the pause, not every retry
    monkeypatch.setattr(runner_module, "run_batch", real_run_batch)
    with caplog.at_level(logging.INFO, logger="anomaly_monitor.worker"):
        assert worker.poll("plant", budget_seconds=float("inf")).status == "running"
    assert pause_info(registry, "plant") == []
    assert registry.get_sample_value("anomaly_monitor_paused", {"monitor": "plant"}) == 0
    assert any("resumed: a batch succeeded" in r.getMessage() for r in caplog.records)


def test_a_malformed_timestamp_does_not_block_the_monitor(plant):
    engine, table, monitor, sensors, _ = plant
    ids = insert_rows(engine, table, sensors.normal(3))
    if engine.dialect.name == "sqlite":  # SQLite stores whatever text it is given
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE readings SET ts = 'garbage' WHERE id = :i"),
                               {"i": ids[1]})
    results = drain(engine, monitor)
    assert sum(r.rows for r in results) == 3


def test_activating_a_model_for_other_features_is_refused(plant):
    engine = plant[0]
    other = monitor_settings(features=("f0", "f1"))
    with pytest.raises(SchemaError, match="trained on features"), engine.begin() as connection:
        activate_checked(connection, other, None, 1)


def test_training_window_since_until(plant):
    engine, table, monitor, _, _ = plant
    with engine.connect() as connection:
        stamps = [r[0] for r in connection.execute(sa.select(table.c.ts).order_by(table.c.id))]
    since, until = stamps[200], stamps[1000]
    since = since if since.tzinfo else since.replace(tzinfo=dt.UTC)
    until = until if until.tzinfo else until.replace(tzinfo=dt.UTC)
    report = train_monitor(engine, monitor, since=since, until=until, device="cpu",
                           activate_version=False)
    training = report.version.training
    assert training["first_id"] == 201 and training["last_id"] == 1000
    assert training["rows"] + training["holdout_rows"] == 800


def test_two_trains_at_once_both_store_a_version(plant, db_url):
    """Another train stores the next version number between this one's read of it and
    its insert: this one takes the number after (no raw UNIQUE error)."""
    from anomaly_monitor.db import create_engine

    engine, _, monitor, _, _ = plant
    other = create_engine(db_url)
    columns = [c for c in model_versions.c if c.name != "id"]
    raced = []

    def race(_conn, _cursor, statement, *_args):
        if not raced and statement.lstrip().upper().startswith("INSERT INTO AM_MODEL_VERSIONS"):
            raced.append(True)
            copy = [model_versions.c.version + 1 if c.name == "version" else
                    sa.literal("candidate").label("status") if c.name == "status" else c
                    for c in columns]
            with other.begin() as connection:
                connection.execute(model_versions.insert().from_select(
                    [c.name for c in columns], sa.select(*copy).where(
                        model_versions.c.version == 1)))

    sa.event.listen(engine, "before_cursor_execute", race)
    try:
        report = train_monitor(engine, monitor, device="cpu")
    finally:
        sa.event.remove(engine, "before_cursor_execute", race)
        other.dispose()
    assert raced and report.version.version == 3 and report.version.status == "active"
    with engine.connect() as connection:
        assert [v.version for v in list_versions(connection, "plant")] == [3, 2, 1]


def test_rollback_follows_the_activation_history(plant):
    """After activate 1, activate 3, rollback makes 1 active (not 2, one number lower);
    rolling back again walks further back along the history."""
    from anomaly_monitor.registry import activation_history

    engine, _, monitor, _, _ = plant
    for _ in range(2):
        train_monitor(engine, monitor, device="cpu")  # versions 2 and 3, each activated
    with engine.begin() as connection:
        activate_checked(connection, monitor, None, 1)
        activate_checked(connection, monitor, None, 3)
        assert rollback(connection, monitor).version == 1
        assert rollback(connection, monitor).version == 3  # active before 1 was 3
        assert rollback(connection, monitor).version == 2
        assert rollback(connection, monitor).version == 1
        with pytest.raises(RegistryError, match="nothing to roll back to"):
            rollback(connection, monitor)
        history = activation_history(connection, "plant")
    assert [(v, a) for v, a, _ in history] == [
        (1, "activate"), (2, "activate"), (3, "activate"), (1, "activate"), (3, "activate"),
        (1, "rollback"), (3, "rollback"), (2, "rollback"), (1, "rollback")]
