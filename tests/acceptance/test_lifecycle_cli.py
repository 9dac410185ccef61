"""The model lifecycle as an operator meets it: ``drift``, ``models list`` with a
challenger's gates, ``compare``, ``promote``, ``reject`` and their bad input (one line,
exit 2); and a daemon stopped while it retrains exits cleanly, storing nothing."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys

import sqlalchemy as sa

from anomaly_monitor.tables import model_versions
from tests.acceptance.test_cli import cli, cli_json, workspace  # noqa: F401
from tests.helpers import Sensors, bulk_insert, daemon_config, trained_plant, wait_for


def _one_line(output: str) -> None:
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output


def test_drift_challenger_compare_promote_reject(workspace):  # noqa: F811
    config, engine, table, _ = workspace
    assert "no drift measured: no active version" in cli("--config", config, "drift", "plant")
    cli("--config", config, "train", "plant", "--epochs", "5")
    assert "version 1 has scored no batch yet" in cli("--config", config, "drift", "plant")
    bulk_insert(engine, table, Sensors(seed=8).normal(700) + 2.0,
                start=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=700))
    out = cli("--config", config, "train", "plant", "--epochs", "5", "--no-activate")
    assert "status: shadow" in out
    cli("--config", config, "run", "--once")
    report = cli_json("--config", config, "drift", "plant", "--json")
    assert report["measured"] and report["drifted_features"]
    psi = list(report["features"].values())
    assert psi == sorted(psi, reverse=True)  # most drifted first
    assert "drifted" in cli("--config", config, "drift", "plant")
    listed = cli("--config", config, "models", "list")
    assert "challenger version 2 in shadow (promote = manual)" in listed
    assert "burn_in" in listed and "flag_rate" in listed
    versions = cli_json("--config", config, "models", "list", "--json")
    gates = {g["name"]: g for g in next(v for v in versions if v["version"] == 2)["gates"]}
    assert gates["burn_in"]["passed"] is False  # 700 of 1000 rows
    status = cli_json("--config", config, "status", "--json")["monitors"][0]
    assert status["challenger"]["version"] == 2 and status["challenger"]["shadow_rows"] == 700
    compared = cli_json("--config", config, "models", "compare", "1", "2", "--json")
    assert [v["shadow_rows"] for v in compared["versions"]] == [0, 700]
    # Bad input: one line, exit 2.
    for args, words in ((("models", "promote", "1"), "it is active already"),
                        (("models", "reject", "9"), "no model version 9"),
                        (("models", "compare", "2", "2"), "not version 2 with itself"),
                        (("models", "reject", "2", "--reason", "x" * 3000), "at most 2000"),
                        (("drift", "nosuch"), "no monitor named 'nosuch'")):
        out = cli("--config", config, *args, expect=2, stderr=True)
        assert words in out, out
        _one_line(out)
    out = cli("--config", config, "models", "promote", "2", "--by", "ana")
    assert "promoted challenger version 2" in out and "gates not passed: burn_in" in out
    shown = cli("--config", config, "models", "show", "2")
    assert "as a challenger: promoted by ana" in shown
    cli("--config", config, "train", "plant", "--epochs", "5", "--no-activate")
    assert "rejected challenger version 3" in cli(
        "--config", config, "models", "reject", "3", "--reason", "too eager")
    out = cli("--config", config, "models", "reject", "3", expect=2, stderr=True)
    assert "its status is rejected" in out
    _one_line(out)
    assert "rejected by" in cli("--config", config, "models", "show", "3")


def test_a_daemon_stopped_while_it_retrains_exits_cleanly(engine, tmp_path):
    _, monitor, _, _ = trained_plant(engine)
    with engine.begin() as connection:  # version 1 is old: a scheduled retrain is due
        connection.execute(model_versions.update().values(
            created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)))
    config = tmp_path / "am.toml"
    # Long enough a fit to be stopped in the middle of it.
    config.write_text(daemon_config(engine, monitor.features, 1)
                      + "\n[monitor.retrain]\nevery_seconds = 3600\nwindow_rows = 600\n"
                      + "\n[monitor.model]\nepochs = 400\npatience = 400\nn_estimators = 3\n")
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "anomaly_monitor", "--config", str(config), "run"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: "retraining (schedule)" in log.read_text(), timeout=60, interval=0.2)
        wait_for(lambda: "fitting" in log.read_text() or "fit " in log.read_text(),
                 timeout=60, interval=0.1)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert daemon.returncode == 0, text[-3000:]
    assert "stopping the running retrain" in text and "terminate called" not in text
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(model_versions)
                                  ).scalar() == 1  # nothing half-made
