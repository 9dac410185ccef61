"""What the operator sees of training and calibration: progress while training runs,
a readable ``models show``, calibrating a candidate before it is activated, rows the
model has not seen in the dry run, and output into a closed pipe."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from click.testing import CliRunner

from anomaly_monitor.cli import main
from anomaly_monitor.detectors import progress
from anomaly_monitor.detectors.progress import FitProgress
from anomaly_monitor.registry import get_version
from tests.helpers import FEATURES, Sensors, bulk_insert, daemon_config, insert_rows, source_table


def _config(tmp_path, engine) -> str:
    config = tmp_path / "am.toml"
    config.write_text(daemon_config(engine, FEATURES, 1.0))
    return str(config)


def _cli(config: str, *args: str, expect: int = 0) -> str:
    result = CliRunner().invoke(main, ["--config", config, *args])
    assert result.exit_code == expect, result.output
    return result.stdout if expect == 0 else result.output


def test_progress_is_logged_every_interval_and_at_the_end(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="anomaly_monitor.training"), \
            FitProgress(200, "fit dae", bar=False, clock=lambda: now[0]) as bar:
        for _ in range(20):  # the first of 2 estimators: 20 epochs of 1 s, then it stops
            now[0] += 1.0
            bar.update(1)
            bar.set_postfix(val_loss="0.5")
        bar.skip(80)
        for _ in range(15):  # the second runs on at the same pace
            now[0] += 1.0
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("fit dae: 10/200 epochs (5%), 10 s so far, at most about 190 s left, "
                        "val_loss 0.5")
    # After early stopping, the estimate keeps the pace of the epochs actually run.
    assert lines[2] == ("fit dae: 110/200 epochs (55%), 30 s so far, at most about 90 s left, "
                        "val_loss 0.5")
    assert lines[-1] == ("fit dae: done, 35 epochs run (80 left out by early stopping) in "
                         "35 s, val_loss 0.5") and len(lines) == 4


def test_train_without_a_terminal_logs_its_progress(engine, tmp_path, caplog, monkeypatch):
    bulk_insert(engine, source_table(engine), Sensors(seed=3).normal(400))
    config = _config(tmp_path, engine)
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO):
        _cli(config, "-v", "train", "plant", "--epochs", "4")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("train plant: read 400 rows of ") for line in lines), lines
    fit = "fit vae (3 x up to 4 epochs): "  # the ensemble's networks, each early-stopped
    assert any(line.startswith(fit) and " epochs (" in line for line in lines), lines
    assert any(line.startswith(fit + "done, ") and " epochs run" in line for line in lines)
    assert any(line.startswith("train plant: stored version 1 (active)") for line in lines)


def test_a_candidate_is_calibrated_and_shown_before_it_is_activated(engine, tmp_path):
    sensors = Sensors(seed=4)
    table = source_table(engine)
    bulk_insert(engine, table, sensors.normal(400))
    config = _config(tmp_path, engine)
    _cli(config, "train", "plant", "--epochs", "3")
    insert_rows(engine, table, sensors.normal(50))
    _cli(config, "train", "plant", "--epochs", "3", "--no-activate")
    with engine.connect() as connection:
        active_before = get_version(connection, "plant", 1).threshold
        candidate_before = get_version(connection, "plant", 2).threshold

    # Right after training every row is the candidate's own: the dry run says so.
    out = _cli(config, "calibrate", "plant", "--version", "2", "--dry-run")
    assert "version 2 (shadow)" in out
    assert "recent rows: none yet after the training window (last id 450)" in out
    insert_rows(engine, table, sensors.normal(30))
    plan = json.loads(_cli(config, "calibrate", "plant", "--version", "2", "--dry-run",
                           "--json"))
    assert plan["recent_rows"] == 30 and plan["recent_ids"] == [451, 480]
    assert plan["version_status"] == "shadow"  # a challenger beside version 1

    out = _cli(config, "calibrate", "plant", "--version", "2", "--method", "quantile",
               "--target-fpr", "0.05")
    assert "threshold of version 2 set to" in out
    assert "version 2 is not active; review it, then: anomaly-monitor models activate 2" in out
    with engine.connect() as connection:
        assert get_version(connection, "plant", 1).threshold == active_before
        assert get_version(connection, "plant", 2).threshold < candidate_before
    shown = _cli(config, "models", "show", "2")
    assert "version 2 (vae): shadow" in shown and "threshold " in shown
    assert "(quantile, target_fpr 0.05)" in shown
    assert "no model version 7" in _cli(config, "calibrate", "plant", "--version", "7",
                                        expect=2)
    # A plot that cannot be written is refused before any work, nothing changed.
    assert "ending in .png" in _cli(config, "calibrate", "plant", "--plot",
                                    str(tmp_path / "x.txt"), expect=2)
    assert "does not exist or is not writable" in _cli(
        config, "calibrate", "plant", "--plot", str(tmp_path / "no" / "x.png"), expect=2)
    with engine.connect() as connection:
        assert get_version(connection, "plant", 1).threshold == active_before
    # Activating the active version changes nothing, not even the history.
    assert "version 1 is already active; nothing changed" in _cli(config, "models",
                                                                "activate", "1")
    assert "monitor plant: activations, oldest first: 1\n" in _cli(config, "models", "list")


def test_output_into_a_closed_pipe_ends_quietly(engine, tmp_path):
    bulk_insert(engine, source_table(engine), Sensors(seed=5).normal(100))
    config = _config(tmp_path, engine)
    # The reader is gone before the command writes (``models list | head -0``).
    process = subprocess.Popen([sys.executable, "-m", "anomaly_monitor", "--config", config,
                                "models", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""
