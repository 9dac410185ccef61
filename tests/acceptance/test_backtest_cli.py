"""``backtest`` as an operator runs it before go-live: a candidate version against the
active one on the same history, a plot, JSON; bad input is one line and exit 2."""

from __future__ import annotations

import datetime as dt

from tests.acceptance.test_cli import cli, cli_json, workspace  # noqa: F401
from tests.helpers import Sensors, insert_rows


def _one_line(output: str) -> None:
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output


def test_backtest_compares_versions_on_the_same_history(workspace, tmp_path):  # noqa: F811
    config, engine, table, _ = workspace
    cli("--config", config, "train", "plant", "--epochs", "5")
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(minutes=1)
    sensors = Sensors(seed=5)
    insert_rows(engine, table, sensors.normal(50), start=start)
    real = insert_rows(engine, table, sensors.anomalous(6), label=1,
                       start=start + dt.timedelta(minutes=50))
    cli("--config", config, "run", "--once")
    flagged = {a["source_id"] for a in cli_json("--config", config, "anomalies", "plant",
                                                 "--json", "--limit", "500")}
    cli("--config", config, "train", "plant", "--epochs", "3", "--no-activate")
    since = start.isoformat()
    until = (start + dt.timedelta(hours=2)).isoformat()
    active = cli_json("--config", config, "backtest", "plant", "--since", since, "--until",
                      until, "--json")
    assert active["version"] == 1 and active["rows"] == 56 and not active["written"]
    assert {f["source_id"] for f in active["flags"]} == flagged  # what run flagged
    (summary,) = active["thresholds"]
    assert summary["recall"] == 1.0 and active["labels_from"] == "label column"
    assert summary["incidents"] >= 1 and sum(summary["severity"].values()) == len(flagged)
    candidate = cli_json("--config", config, "backtest", "plant", "--since", since,
                         "--until", until, "--version", "2", "--threshold", "5",
                         "--threshold", "50", "--json")
    assert candidate["version_status"] == "shadow"  # not activated: a challenger
    low, high = candidate["thresholds"]
    assert low["threshold"] == 5 and low["flags"] >= high["flags"]
    plot = tmp_path / "backtest.png"
    out = cli("--config", config, "backtest", "plant", "--since", since, "--until", until,
              "--plot", plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "per day" in out and "nothing was written" in out and "precision" in out
    assert f"wrote {plot}" in out
    assert set(real) <= flagged
    after = cli_json("--config", config, "anomalies", "plant", "--json", "--limit", "500")
    assert {a["source_id"] for a in after} == flagged  # nothing written


def test_bad_backtest_input_is_one_line_and_exit_2(workspace, tmp_path):  # noqa: F811
    config, _, _, _ = workspace
    cli("--config", config, "train", "plant", "--epochs", "3")
    base = ["--config", config, "backtest", "plant"]
    for args, message in [
        (["--since", "2026-05-02", "--until", "2026-05-01"], "must be after --since"),
        (["--since", "2026-05-01", "--version", "9"], "version 9"),
        (["--since", "2026-05-01", "--plot", tmp_path / "x.jpg"], "ending in .png"),
        (["--until", "2026-05-01"], "Missing option '--since'"),
        (["--since", "2026-05-01", "--threshold", "nan"], "finite"),
    ]:
        out = cli(*base, *args, expect=2, stderr=True)
        assert message in out, out
        _one_line(out)
    out = cli("--config", config, "backtest", "nope", "--since", "2026-05-01", expect=2,
              stderr=True)
    assert "no monitor named 'nope'" in out
