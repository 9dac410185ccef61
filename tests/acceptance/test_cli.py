"""The command line as users run it: CliRunner for the commands, subprocesses for the
daemon, ``python -m`` and the demo."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from anomaly_monitor import migrate
from anomaly_monitor.cli import main
from anomaly_monitor.db import create_engine
from tests.helpers import FEATURES, Sensors, bulk_insert, insert_rows, source_table, wait_for
from tests.pgserver import free_port

CONFIG = """
[database]
url = "{url}"

[metrics]
port = {port}

[[monitor]]
name = "plant"
table = "readings"
timestamp_column = "ts"
features = [{features}]
label_column = "label"
kind = "dae"
interval_seconds = 1
batch_size = 200

[monitor.threshold]
method = "quantile"
target_fpr = 0.01

[monitor.model]
n_estimators = 1
patience = 5
"""


@pytest.fixture
def workspace(db_url, tmp_path):
    """A config file and a source table with 1000 rows of history."""
    engine = create_engine(db_url)
    table = source_table(engine)
    bulk_insert(engine, table, Sensors().normal(1000))
    path = tmp_path / "am.toml"
    port = free_port()
    path.write_text(CONFIG.format(url=db_url, port=port,
                                  features=", ".join(f'"{f}"' for f in FEATURES)))
    yield path, engine, table, port
    engine.dispose()


def cli(*args, expect=0, stderr=False):
    """Run the CLI in-process; returns stdout and stderr together, or stderr alone."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.stderr if stderr else result.output


def shown_threshold(config):
    return json.loads(cli("--config", config, "models", "show", "1", "--json"))["threshold"]


def test_train_calibrate_run_status_anomalies(workspace, tmp_path):
    config, engine, table, _ = workspace
    assert "reachable" in cli("--config", config, "check")
    out = cli("--config", config, "train", "plant", "--epochs", "10")
    assert "version 1 (dae) trained on 800 rows, 200 held out" in out
    assert "status: active" in out
    assert re.search(r"\| *1 *\| *dae|plant +1 +dae +active", cli("--config", config,
                                                                 "models", "list"))
    summary = cli("--config", config, "models", "show", "1")  # readable, a screen at most
    assert "version 1 (dae): active" in summary and "threshold " in summary
    assert len(summary.splitlines()) < 20 and "levels" not in summary
    shown = json.loads(cli("--config", config, "models", "show", "1", "--json"))
    assert shown["status"] == "active" and shown["features"] == list(FEATURES)
    architecture = shown["training"]["architecture"]  # chosen from the data at fit
    assert 1 <= architecture["latent_dim"] < len(FEATURES) and architecture["hidden_dims"]
    before = shown["threshold"]
    out = cli("--config", config, "calibrate", "plant", "--dry-run", "--target-fpr", "0.05")
    assert "dry run: nothing changed" in out and "quantile fpr=0.05" in out
    assert shown_threshold(config) == before
    plot = tmp_path / "scores.png"
    out = cli("--config", config, "calibrate", "plant", "--target-fpr", "0.05", "--plot", plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shown_threshold(config) < before
    sensors = Sensors(seed=5)
    insert_rows(engine, table, sensors.normal(100))
    anomalies = insert_rows(engine, table, sensors.anomalous(10), label=1)
    insert_rows(engine, table, [[None] * len(FEATURES)])
    out = cli("--config", config, "run", "--once")
    assert re.search(r"monitor plant: done, \d+ batches, 111 rows, \d+ flagged, 1 quarantined",
                     out)
    status = json.loads(cli("--config", config, "status", "--json"))["monitors"][0]
    assert status["backlog"] == 0 and status["active_version"] == 1
    assert status["anomalies_24h"] >= 9 and status["last_batch"]["quarantined"] <= 1
    assert "plant" in cli("--config", config, "status")
    flagged = json.loads(cli("--config", config, "anomalies", "plant", "--json", "--limit",
                             "100"))
    assert len({a["source_id"] for a in flagged} & set(anomalies)) >= 9
    assert all(len(a["top_features"]) == 3 for a in flagged)
    assert "top features" in cli("--config", config, "anomalies", "plant")
    found = json.loads(cli("--config", config, "incidents", "plant", "--json"))
    run = [i for i in found if i["first_source_id"] <= anomalies[0] <= i["last_source_id"]]
    assert len(run) == 1 and run[0]["rows"] >= 9 and len(found) < len(flagged)
    assert {a["incident_id"] for a in flagged if a["source_id"] in anomalies} == {run[0]["id"]}
    table_out = cli("--config", config, "incidents", "plant", "--since", "2000-01-01")
    assert "top features" in table_out and str(run[0]["id"]) in table_out
    assert status["incident_gap_seconds"] == pytest.approx(180.0, rel=0.01)  # 3 minutes
    assert "no incidents of monitor 'plant' matching the filters" in cli(
        "--config", config, "incidents", "plant", "--since", "2999-01-01")
    assert status["incidents_open"] == len(json.loads(
        cli("--config", config, "incidents", "plant", "--open", "--json")))
    out = cli("--config", config, "incidents", "plant", "--entity", "x", expect=2, stderr=True)
    assert "has no entity_column" in out and "Traceback" not in out
    assert "no monitor named 'nope'" in cli("--config", config, "incidents", "nope", expect=2,
                                            stderr=True)
    out = cli("--config", config, "models", "rollback", expect=1)
    assert "nothing to roll back to" in out and "Traceback" not in out
    assert "model version 1 verified" in cli("--config", config, "check")
    fewer = tmp_path / "fewer.toml"
    fewer.write_text(config.read_text().replace('"f0", ', ""))
    out = cli("--config", fewer, "check", expect=2, stderr=True)
    assert "trained on features" in out and "anomaly-monitor train plant" in out
    insert_rows(engine, table, sensors.normal(3))
    out = cli("--config", fewer, "run", "--once", expect=2)
    assert "monitor(s) paused: plant" in out
    out = cli("--config", fewer, "status")
    assert "paused by the worker" in out and "trained on features" in out
    assert "no monitor named 'nope'" in cli("--config", config, "models", "list", "--monitor",
                                            "nope", expect=2)


def cli_json(*args):
    """Run the CLI in-process and parse its stdout (stderr has the notes) as JSON."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def candidate(document, label):
    return next(c for c in document["candidates"] if c["label"] == label)


def test_calibrate_dry_run_shows_precision_and_recall_on_contaminated_labelled_history(
    db_url, tmp_path,
):
    # No [monitor.threshold] table: the default method. The held-out fifth of the history
    # (its newest 200 rows) holds 14 labelled anomalies, 7% as in real history.
    engine = create_engine(db_url)
    table = source_table(engine)
    sensors = Sensors(seed=2)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    bulk_insert(engine, table, sensors.normal(900), start=start)
    insert_rows(engine, table, sensors.anomalous(14), label=1, start=start + dt.timedelta(hours=16))
    bulk_insert(engine, table, sensors.normal(86), start=start + dt.timedelta(hours=17))
    engine.dispose()
    config = tmp_path / "am.toml"
    config.write_text(CONFIG.format(url=db_url, port=0,
                                    features=", ".join(f'"{f}"' for f in FEATURES))
                      .replace('[monitor.threshold]\nmethod = "quantile"\ntarget_fpr = 0.01\n', ""))
    assert "threshold" not in config.read_text()
    assert "(robust); held-out flag rate" in cli("--config", config, "train", "plant",
                                                 "--epochs", "10")
    out = cli("--config", config, "calibrate", "plant", "--dry-run")
    assert "200 held-out rows; 200 labelled rows (14 anomalies) from the label column" in out
    assert re.search(r"robust fit: [\d.]+% of held-out rows score above the bulk", out)
    header = next(line for line in out.splitlines() if line.startswith("threshold"))
    assert header.split()[-3:] == ["precision", "recall", "F1"]
    for label in ("robust fpr=0.01", "quantile fpr=0.01", "pot fpr=0.001 (as quantile)",
                  "labels (max F1)", "chosen: robust"):
        assert re.search(rf"^{re.escape(label)} +\S+ +[\d.]+% +\d+( +[\d.-]+){{3}}$", out,
                         re.M), (label, out)
    document = cli_json("--config", config, "calibrate", "plant", "--dry-run", "--json")
    assert document["dry_run"] and document["labelled_anomalies"] == 14
    assert document["holdout_rows"] == document["labelled_rows"] == 200
    assert 0.03 <= document["estimated_contamination"] <= 0.12
    robust, quantile = (candidate(document, f"{m} fpr=0.01") for m in ("robust", "quantile"))
    assert robust["method"] == "robust" and document["chosen"]["method"] == "robust"
    # The quantile threshold takes the anomalies for normal rows and flags 1% (2 rows).
    assert quantile["recall"] <= 0.15 < 0.8 <= robust["recall"]
    assert robust["precision"] >= 0.5 and robust["f1"] > quantile["f1"]
    assert robust["holdout_flag_rate"] == pytest.approx(
        robust["recall"] * 14 / 200 / robust["precision"])


def test_calibrate_json_without_a_label_column_has_no_precision(workspace):
    config, _, _, _ = workspace
    config.write_text(config.read_text().replace('label_column = "label"\n', ""))
    cli("--config", config, "train", "plant", "--epochs", "5")
    out = cli("--config", config, "calibrate", "plant", "--dry-run")
    assert "precision" not in out and "labelled" not in out and "robust fpr=0.01" in out
    document = cli_json("--config", config, "calibrate", "plant", "--dry-run", "--json")
    assert document["labelled_rows"] == 0
    assert all(c["precision"] is None and c["recall"] is None and c["f1"] is None
               for c in document["candidates"])
    assert {"robust", "quantile", "pot"} <= {c["method"] for c in document["candidates"]}


def test_errors_are_one_line_with_the_right_exit_code(workspace, tmp_path):
    config, engine, _, _ = workspace
    missing = cli("--config", tmp_path / "nope.toml", "check", expect=2)
    assert "nope.toml not found" in missing
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace('features = [', 'features = ["nope", '))
    out = cli("--config", bad, "check", expect=2)
    assert "column 'nope' is missing from table 'readings'" in out
    out = cli("--config", config, "train", "other", expect=2)
    assert "no monitor named 'other'" in out
    empty = tmp_path / "empty.toml"
    with engine.begin() as connection:
        source_table(engine, "empty_readings")
        connection.commit()
    empty.write_text(config.read_text().replace('table = "readings"', 'table = "empty_readings"'))
    out = cli("--config", empty, "train", "plant", expect=1)
    assert "has 0 usable rows" in out
    for output in (missing, out):
        assert len(output.strip().splitlines()) == 1 and "Traceback" not in output


def test_a_database_that_is_down_is_one_line_without_the_password(tmp_path):
    port = free_port()
    path = tmp_path / "down.toml"
    path.write_text(CONFIG.format(url=f"postgresql+psycopg://am:hunter2secret@127.0.0.1:{port}/x",
                                  port=0, features='"f0"'))
    for args in (["check"], ["status", "--json"], ["run", "--once"]):
        out = cli("--config", path, *args, expect=1)
        assert "hunter2secret" not in out and "Traceback" not in out
        error = cli("--config", path, *args, expect=1, stderr=True)
        assert error.startswith("Error: database error") and "***" in error
        assert len(error.strip().splitlines()) == 1


def test_a_malformed_url_or_revision_is_a_usage_error(tmp_path):
    path = tmp_path / "url.toml"
    path.write_text(CONFIG.format(url="postgresql://am:pw-secret@db:notaport/x", port=0,
                                  features='"f0"'))
    error = cli("--config", path, "check", expect=2, stderr=True)
    assert "invalid database URL" in error and "pw-secret" not in error
    path.write_text(CONFIG.format(url=f"sqlite:///{tmp_path / 'x.db'}", port=0, features='"f0"'))
    assert "migration:" in cli("--config", path, "db", "upgrade", "nosuchrev", expect=2,
                               stderr=True)


def test_init_writes_a_config_that_check_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANOMALY_MONITOR_CONFIG", raising=False)
    assert "wrote anomaly-monitor.toml" in cli("init")
    assert "already exists" in cli("init", expect=1)
    # check only looks: it does not create the SQLite file the config names
    assert "anomaly-monitor db upgrade creates it" in cli("check", expect=2)
    # Nor does any other command but db upgrade, read-only or not.
    for args in (["db", "current"], ["cursor", "plant"], ["train", "plant"],
                 ["calibrate", "plant", "--dry-run"], ["models", "activate", "1"],
                 ["models", "rollback"], ["run", "--once"],
                 ["backfill", "plant", "--from-id", "1", "--to-id", "2"]):
        assert "anomaly-monitor db upgrade creates it" in cli(*args, expect=2), args
    assert not (tmp_path / "anomaly_monitor.db").exists()
    assert f"at revision {migrate.head_revision()}" in cli("db", "upgrade")
    assert "up to date" in cli("db", "current")
    out = cli("check", expect=2)  # the example's table does not exist yet
    assert "table 'readings' does not exist" in out
    assert "give --yes" in cli("db", "downgrade", "base", expect=2)  # stdin is no terminal
    assert "up to date" in cli("db", "current")  # nothing was dropped
    assert "revision base" in cli("db", "downgrade", "base", "--yes")


def test_commands_on_an_unmigrated_database_name_db_upgrade(tmp_path):
    path = tmp_path / "am.toml"
    database = tmp_path / "x.db"
    path.write_text(CONFIG.format(url=f"sqlite:///{database}", port=0, features='"f0"'))
    sa.create_engine(f"sqlite:///{database}").connect().close()  # an empty file
    for args in (["models", "list"], ["models", "show", "1"], ["models", "activate", "1"],
                 ["models", "rollback"], ["anomalies", "plant"], ["quarantine", "plant"],
                 ["calibrate", "plant", "--dry-run"], ["status"], ["label", "plant", "1", "--tp"],
                 ["feedback", "plant"]):
        out = cli("--config", path, *args, expect=2, stderr=True)
        assert "at revision base" in out and "run: anomaly-monitor db upgrade" in out, args
        assert len(out.strip().splitlines()) == 1, out


def test_db_downgrade_takes_relative_revisions_and_names_what_base_drops(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(CONFIG.format(url=f"sqlite:///{tmp_path / 'x.db'}", port=0, features='"f0"'))
    cli("--config", path, "db", "upgrade")
    assert "at revision 0010" in cli("--config", path, "db", "downgrade", "-1")
    assert "at revision 0001" in cli("--config", path, "db", "downgrade", "-9")
    out = cli("--config", path, "db", "downgrade", "-1", expect=2)  # 0001 -> base
    assert "drops every am_ table" in out and "0 model versions" in out
    assert "no revision 'nosuch'" in cli("--config", path, "db", "downgrade", "nosuch",
                                         expect=2)
    assert "cannot go down 3" in cli("--config", path, "db", "downgrade", "-3", expect=2)
    assert "revision base" in cli("--config", path, "db", "downgrade", "-1", "--yes")


def scrape(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""


def rows_scored(port):
    match = re.search(r'^anomaly_monitor_rows_scored_total\{monitor="plant"\} (\S+)$',
                      scrape(port), re.M)
    return float(match.group(1)) if match else -1.0


def test_daemon_scores_new_rows_serves_metrics_and_stops_on_sigterm(workspace):
    config, engine, table, port = workspace
    cli("--config", config, "train", "plant", "--epochs", "5")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    daemon = subprocess.Popen([sys.executable, "-m", "anomaly_monitor", "--config", str(config),
                               "run"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    try:
        wait_for(lambda: rows_scored(port) == 0, timeout=60, interval=0.2)
        insert_rows(engine, table, Sensors(seed=9).normal(50))
        wait_for(lambda: rows_scored(port) == 50, timeout=30, interval=0.2)
        body = scrape(port)
        assert 'anomaly_monitor_model_info{kind="dae",monitor="plant",version="1"} 1.0' in body
        assert 'anomaly_monitor_backlog_rows{monitor="plant"} 0.0' in body
        daemon.send_signal(signal.SIGTERM)
        output, _ = daemon.communicate(timeout=10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, output
    assert "received SIGTERM" in output and "stopped" in output


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "anomaly_monitor", "--version"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith("anomaly-monitor, version")


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(["anomaly-monitor", "demo", "--seconds", "15", "--port", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"precision (\S+), recall (\S+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) >= 0.8 and float(match.group(2)) >= 0.5
    assert "top anomalies:" in result.stdout and "anomaly-monitor --config" in result.stdout
    assert (tmp_path / "anomaly-monitor-demo.db").exists()
