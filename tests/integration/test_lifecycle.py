"""The model lifecycle on SQLite and PostgreSQL: drift against the training reference,
a challenger scoring in shadow (nothing written to am_anomalies), its promotion gates,
promotion by the daemon or by hand, rejection, and retention of artifacts."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.config import RetrainSettings
from anomaly_monitor.drift import DRIFT_LEVEL, read_drift, stored_report
from anomaly_monitor.lifecycle import train_monitor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import (
    RegistryError,
    get_version,
    list_versions,
    load_model,
    prune_artifacts,
)
from anomaly_monitor.shadow import shadow_totals
from anomaly_monitor.tables import anomalies, shadow_batches
from anomaly_monitor.worker import Worker
from tests.helpers import Sensors, bulk_insert, drain, settings, trained_plant

SHIFT = 1.5


def _flag_versions(engine) -> dict[int, int]:
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(anomalies.c.source_id,
                                                 anomalies.c.model_version)).all())


def test_drift_stays_low_on_normal_rows_and_rises_after_a_mean_shift(engine):
    table, monitor, _, report = trained_plant(engine)
    reference = report.version.validation["reference"]
    assert set(reference["features"]) == set(monitor.features)
    sensors = Sensors(seed=5)
    bulk_insert(engine, table, sensors.normal(800))
    results = drain(engine, monitor)
    calm = results[-1].drift
    assert calm is not None and calm.measured
    assert calm.drift_score < DRIFT_LEVEL and not calm.drifting, calm.features
    bulk_insert(engine, table, sensors.normal(1500) + SHIFT)
    shifted = drain(engine, monitor)[-1].drift
    assert shifted.drift_score >= DRIFT_LEVEL and len(shifted.drifted) >= 3
    assert shifted.drifting
    with engine.connect() as connection:
        stored, _ = stored_report(connection, "plant")
        state = read_drift(connection, "plant", report.version.version)
    assert stored["drift_score"] == pytest.approx(shifted.drift_score)
    assert state.rows == 2300
    # Another version starts its counts afresh.
    with engine.connect() as connection:
        assert read_drift(connection, "plant", 99).rows == 0


def test_a_challenger_scores_in_shadow_then_the_daemon_promotes_it(db_url, engine):
    retrain = RetrainSettings(on_drift=True, window_rows=1200, shadow_rows=400,
                              promote="auto")
    table, monitor, _, first = trained_plant(engine)
    monitor = dataclasses.replace(monitor, retrain=retrain, batch_size=400)
    sensors = Sensors(seed=7)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    bulk_insert(engine, table, sensors.normal(1500) + SHIFT)
    worker = Worker(settings(db_url, monitor), engine, metrics, device="cpu")
    worker.run_once()  # scores the shift with version 1, drifts, retrains a challenger
    with engine.connect() as connection:
        versions = {v.version: v for v in list_versions(connection, "plant")}
    assert versions[2].status == "shadow" and versions[2].training["trigger"] == "drift"
    assert versions[1].status == "active"
    assert registry.get_sample_value("anomaly_monitor_retrains_total",
                                     {"monitor": "plant", "outcome": "success"}) == 1
    assert registry.get_sample_value("anomaly_monitor_drift_score",
                                     {"monitor": "plant"}) >= DRIFT_LEVEL
    before = set(_flag_versions(engine))
    bulk_insert(engine, table, sensors.normal(800) + SHIFT)
    worker.run_once()  # 800 rows in shadow: its gates pass, it is promoted
    with engine.connect() as connection:
        totals = shadow_totals(connection, "plant", 2)
        assert get_version(connection, "plant", 2).status == "active"
        assert get_version(connection, "plant", 1).status == "retired"
        decision = get_version(connection, "plant", 2).validation["decision"]
    assert totals.rows == 800 and totals.flagged < totals.active_flagged
    assert decision["action"] == "promoted" and decision["by"] == "gates"
    flags = _flag_versions(engine)
    # Nothing the challenger flagged in shadow was written: every flag is version 1's.
    assert set(flags.values()) == {1}
    old_flags = len(flags) - len(before)
    bulk_insert(engine, table, sensors.normal(800) + SHIFT)
    worker.run_once()  # now version 2 scores, and flags far fewer of the shifted rows
    flags = _flag_versions(engine)
    new_flags = [i for i, v in flags.items() if v == 2]
    assert len(new_flags) < old_flags / 4, (len(new_flags), old_flags)
    assert registry.get_sample_value("anomaly_monitor_challenger_decisions_total",
                                     {"monitor": "plant", "decision": "promoted"}) == 1
    assert first.version.version == 1


def test_train_no_activate_makes_a_challenger_rejected_by_hand(engine):
    table, monitor, _, _ = trained_plant(engine)
    report = train_monitor(engine, monitor, device="cpu", activate_version=False)
    assert report.version.status == "shadow"
    bulk_insert(engine, table, Sensors(seed=2).normal(300))
    drain(engine, monitor)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(shadow_batches)).all()
    assert sum(r.rows for r in rows) == 300 and {r.version for r in rows} == {2}
    # A newer challenger replaces it.
    report = train_monitor(engine, monitor, device="cpu", activate_version=False)
    with engine.connect() as connection:
        old = get_version(connection, "plant", 2)
        assert old.status == "rejected"
        assert old.validation["decision"]["reason"].startswith("superseded")
        assert get_version(connection, "plant", 3).status == "shadow"


def test_retention_keeps_the_newest_the_active_and_the_rollback_target(engine):
    _, monitor, _, _ = trained_plant(engine)
    monitor = dataclasses.replace(monitor, keep_versions=2)
    for _ in range(3):
        train_monitor(engine, monitor, device="cpu")  # versions 2, 3, 4 (active)
    with engine.connect() as connection:
        statuses = {v.version: (v.status, v.pruned_at is not None)
                    for v in list_versions(connection, "plant")}
        # 4 active and newest, 3 the rollback target, 2 pruned, 1 pruned.
        assert statuses == {4: ("active", False), 3: ("retired", False),
                            2: ("retired", True), 1: ("retired", True)}
        with pytest.raises(RegistryError, match="removed by retention"):
            load_model(connection, "plant", 1)
    with engine.begin() as connection:
        assert prune_artifacts(connection, "plant", 1) == []  # 3 is still protected


def test_a_window_monitors_challenger_scores_with_its_own_entity_states(engine):
    from anomaly_monitor.entities import read_states
    from tests.integration.test_window_monitor import HOSTS, host_rows, train_hosts

    table, monitor, _, last = train_hosts(engine)
    second = train_monitor(engine, dataclasses.replace(monitor, model={
        **monitor.model, "random_state": 3}), device="cpu", activate_version=False)
    assert second.version.status == "shadow"
    with engine.begin() as connection:
        connection.execute(table.insert(), host_rows(last + 1, 60, seed=4))
    drain(engine, monitor)
    with engine.connect() as connection:
        totals = shadow_totals(connection, "hosts", 2)
        spec = load_model(connection, "hosts", 2).window
        moved = read_states(connection, "hosts", 2, HOSTS, spec)
        flags = connection.execute(sa.select(anomalies.c.model_version)).scalars().all()
    assert totals.rows == 180 and set(flags) <= {1}
    # The challenger's states moved with what it scored (to the last row of each host).
    assert {moved[h].last_id for h in HOSTS} == {last + 178, last + 179, last + 180}
    # Its score drift is measured against the window monitor's own reference.
    with engine.connect() as connection:
        report, _ = stored_report(connection, "hosts")
    assert report["version"] == 1 and set(report["features"]) == {"cpu", "mem"}


def test_scoring_goes_on_while_the_daemon_retrains(db_url, engine, monkeypatch):
    import threading

    import anomaly_monitor.lifecycle as lifecycle
    from anomaly_monitor.tables import model_versions

    table, monitor, _, _ = trained_plant(engine)
    monitor = dataclasses.replace(monitor, retrain=RetrainSettings(every_seconds=60,
                                                                   window_rows=600))
    with engine.begin() as connection:  # version 1 is two minutes old: a retrain is due
        old = connection.execute(sa.select(model_versions.c.created_at)).scalar()
        connection.execute(model_versions.update().values(
            created_at=old - dt.timedelta(minutes=2)))
    release, started = threading.Event(), threading.Event()
    real = lifecycle.train_monitor

    def slow_train(*args, **kwargs):
        started.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "train_monitor", slow_train)
    registry = CollectorRegistry()
    worker = Worker(settings(db_url, monitor), engine, Metrics(registry), device="cpu")
    runner = worker.runners["plant"]
    try:
        bulk_insert(engine, table, Sensors(seed=9).normal(200))
        worker.poll("plant", budget_seconds=30)  # scores, then starts the retrain
        assert started.wait(30) and runner.retrainer.training
        for seed in (10, 11):  # the retrain holds on; batches commit meanwhile
            bulk_insert(engine, table, Sensors(seed=seed).normal(100))
            assert worker.poll("plant", budget_seconds=30).rows == 200 + 100 * (seed - 9)
    finally:
        release.set()
        runner.retrainer.wait(120)
    worker.poll("plant", budget_seconds=30)
    assert registry.get_sample_value("anomaly_monitor_retrains_total",
                                     {"monitor": "plant", "outcome": "success"}) == 1
    assert registry.get_sample_value(
        "anomaly_monitor_last_retrain_success_timestamp_seconds", {"monitor": "plant"}) > 0
    with engine.connect() as connection:
        v2 = get_version(connection, "plant", 2)
    assert v2.status == "shadow" and v2.training["trigger"] == "schedule"
    assert v2.training["last_id"] <= 800  # rows scored when it started, no later
    worker.release_leases()


def test_a_decided_challenger_cannot_be_decided_again(engine):
    from anomaly_monitor.lifecycle import activate_checked
    from anomaly_monitor.retraining import judge
    from anomaly_monitor.shadow import record_promotion, reject

    _, monitor, _, _ = trained_plant(engine)
    train_monitor(engine, monitor, device="cpu", activate_version=False)  # version 2
    with engine.connect() as connection:
        stale = judge(connection, monitor)  # what a worker judged before the reject
    with engine.begin() as connection:
        reject(connection, "plant", 2, by="operator", reason="looks off")
    with engine.begin() as connection, pytest.raises(RegistryError, match="not a challenger"):
        record_promotion(connection, monitor, stale.version, by="gates", gates=stale.gates)
        activate_checked(connection, monitor, None, stale.version, action="promote")
    with engine.begin() as connection, pytest.raises(RegistryError, match="not a challenger"):
        reject(connection, "plant", 1, by="operator", reason="the active one")
    with engine.connect() as connection:
        assert get_version(connection, "plant", 1).status == "active"
        assert get_version(connection, "plant", 2).status == "rejected"


def test_a_broken_challenger_never_holds_the_active_version_back(engine):
    from anomaly_monitor.tables import model_versions

    table, monitor, _, _ = trained_plant(engine)
    train_monitor(engine, monitor, device="cpu", activate_version=False)
    with engine.begin() as connection:  # its artifact no longer matches its hash
        connection.execute(model_versions.update().where(model_versions.c.version == 2)
                           .values(artifact_sha256="0" * 64))
    bulk_insert(engine, table, Sensors(seed=3).normal(120))
    results = drain(engine, monitor)
    assert sum(r.rows for r in results) == 120 and {r.model_version for r in results} == {1}
    assert all(r.shadow is None for r in results)


def test_a_batch_of_quarantined_rows_counts_for_the_challenger(engine):
    table, monitor, _, _ = trained_plant(engine)
    train_monitor(engine, monitor, device="cpu", activate_version=False)
    rows = Sensors(seed=4).normal(5)
    rows[:, 0] = np.nan  # every row of the batch is quarantined
    bulk_insert(engine, table, rows)
    drain(engine, monitor)
    with engine.connect() as connection:
        totals = shadow_totals(connection, "plant", 2)
    assert totals.rows == 0 and totals.quarantined == 5


def test_identical_rows_of_a_discrete_feature_do_not_drift(engine):
    # Values like 0.7 are not exact in float32 (how training keeps its matrix): binned
    # at the same precision, the same distribution shows no drift.
    table, monitor, _, _ = trained_plant(engine)
    steps = np.round(np.random.default_rng(0).integers(0, 10, size=(2000, 6)) * 0.1, 1)
    with engine.begin() as connection:
        connection.execute(table.delete())
    bulk_insert(engine, table, steps[:1000])
    train_monitor(engine, monitor, device="cpu")
    bulk_insert(engine, table, steps[1000:])
    report = drain(engine, monitor)[-1].drift
    assert report.measured and report.drift_score < 0.05, report.features


def test_the_quarantine_gate_allows_for_the_noise_of_few_rows(engine):
    from anomaly_monitor.config import RetrainSettings as Shadow
    from anomaly_monitor.shadow import ShadowTotals, evaluate_gates

    _, _, _, report = trained_plant(engine)
    challenger = dataclasses.replace(report.version, training={
        **report.version.training, "rows": 480, "holdout_rows": 120, "skipped_rows": 2})

    def gate(quarantined: int) -> bool | None:
        totals = ShadowTotals(rows=816 - quarantined, quarantined=quarantined)
        gates = evaluate_gates(challenger, report.version, totals, Shadow(shadow_rows=200))
        return next(g for g in gates if g.name == "quarantine").passed

    # 2 of 602 skipped in training; 1% NULLs in shadow is within its noise, 10% is not.
    assert gate(8) is True and gate(80) is False
