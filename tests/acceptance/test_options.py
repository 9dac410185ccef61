"""Options that contradict each other, or the host, are refused up front (exit 2, the
conflict named) instead of being silently ignored or failing later."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from anomaly_monitor.cli import main

CONFIG = """
[database]
url = "sqlite:///{path}"

[[monitor]]
name = "plant"
table = "readings"
timestamp_column = "ts"

[monitor.threshold]
{threshold}
"""


def cli(config, *args: str, expect: int) -> str:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    assert result.exit_code == expect, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(CONFIG.format(path=tmp_path / "x.db", threshold='method = "quantile"'))
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--target-fpr", "0.01", "--alerts-per-day", "5"],
     "--target-fpr and --alerts-per-day conflict"),
    (["--method", "labels", "--target-fpr", "0.2"],
     "--target-fpr does not apply to --method labels"),
    (["--method", "fixed", "--value", "3", "--alerts-per-day", "2"],
     "--alerts-per-day does not apply to --method fixed (it takes --value)"),
    (["--method", "quantile", "--value", "3"], "--value does not apply to --method quantile"),
])
def test_calibrate_refuses_conflicting_options(config, args, message):
    assert message in cli(config, "calibrate", "plant", *args, expect=2)


def test_a_config_with_both_rates_is_refused(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(CONFIG.format(path=tmp_path / "x.db",
                                  threshold="target_fpr = 0.01\nalerts_per_day = 5"))
    out = cli(path, "check", expect=2)
    assert "sets both target_fpr and alerts_per_day" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
@pytest.mark.parametrize("command", [["run", "--once"], ["run"], ["train", "plant"]])
def test_device_cuda_without_cuda_is_refused_up_front(config, command):
    out = cli(config, *command, "--device", "cuda", expect=2)
    assert "--device cuda: no CUDA device is available on this host" in out


@pytest.mark.parametrize("command", [["status"], ["anomalies", "plant"], ["models", "list"],
                                     ["check"]])
def test_read_only_commands_do_not_create_a_database(config, tmp_path, command):
    out = cli(config, *command, expect=2)
    assert "does not exist" in out and "x.db" in out
    assert not (tmp_path / "x.db").exists()


def test_the_daemon_does_not_wait_forever_for_a_database_that_does_not_exist(pg_url, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "am.toml"
    missing = pg_url.rsplit("/", 1)[0] + "/no_such_database"
    path.write_text(CONFIG.format(path="", threshold='method = "quantile"').replace(
        'url = "sqlite:///"', f'url = "{missing}"'))
    done = subprocess.run([sys.executable, "-m", "anomaly_monitor", "--config", str(path),
                           "run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "no_such_database" in done.stderr and "does not exist" in done.stderr
    assert "retrying" not in done.stderr


def test_labels_without_a_label_column_is_a_configuration_error(config, tmp_path):
    # (calibrate --method labels works from operators' feedback: tests/acceptance/
    # test_feedback_cli.py.) Training by labels needs the column.
    path = tmp_path / "labels.toml"
    path.write_text(CONFIG.format(path=tmp_path / "x.db", threshold='method = "labels"'))
    assert "needs label_column" in cli(path, "check", expect=2)


def test_hyperparameter_values_are_checked_before_the_config_is_called_ok(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(CONFIG.format(path=tmp_path / "x.db", threshold='method = "quantile"')
                    + "\n[monitor.model]\nepochs = -3\n")
    cli(path, "db", "upgrade", expect=0)
    out = cli(path, "check", expect=2)
    assert "epochs" in out and ": ok (" not in out.split("epochs")[0]
    assert "PROBLEM: " in out.splitlines()[0]


def test_a_missing_table_is_named_with_its_schema(config):
    cli(config, "db", "upgrade", expect=0)
    out = cli(config, "check", expect=2)
    assert "table 'readings' does not exist in schema 'main'" in out


def test_an_unparseable_url_says_what_a_url_looks_like(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(CONFIG.replace("sqlite:///{path}", "postgresql://u:p@ss:w@rd@h:x/db")
                    .format(threshold='method = "quantile"'))
    out = cli(path, "status", expect=2)
    assert "expected dialect[+driver]://user:password@host[:port]/database" in out
    assert "p@ss" not in out and "w@rd" not in out


def test_an_unescaped_at_in_the_password_is_a_configuration_error(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(CONFIG.replace("sqlite:///{path}", "postgresql://mon:Pa@ss@127.0.0.1/db")
                    .format(threshold='method = "quantile"'))
    for command in (["check"], ["status"], ["run", "--once"]):
        out = cli(path, *command, expect=2)
        assert "must be percent-encoded (%40" in out and "Pa@ss" not in out and "ss@" not in out


def test_a_bad_connection_option_is_a_configuration_error(pg_url, tmp_path):
    path = tmp_path / "am.toml"
    bad = pg_url + "?options=-c%20statement_timeout%3Dabc"
    path.write_text(CONFIG.replace("sqlite:///{path}", bad).format(threshold='method = "quantile"'))
    out = cli(path, "status", expect=2)
    assert "statement_timeout" in out
