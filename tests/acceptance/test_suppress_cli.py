"""Suppression as an operator sets it: ``suppress add|list|remove`` and recurring windows
in the config; bad input is a one-line error with exit code 2."""

from __future__ import annotations

import datetime as dt

from tests.acceptance.test_cli import cli, cli_json, workspace  # noqa: F401
from tests.helpers import Sensors, insert_rows

RECURRING = """
[[monitor.suppress]]
name = "nightly"
cron = "30 1 * * *"
duration_seconds = 1800
timezone = "America/New_York"
reason = "backups"
skip_training = true
"""


def _one_line(output: str) -> None:
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output


def test_suppress_add_list_remove_and_the_flags_it_marks(workspace):  # noqa: F811
    config, engine, table, _ = workspace
    config.write_text(config.read_text().replace("[monitor.threshold]",
                                                 RECURRING + "\n[monitor.threshold]"))
    cli("--config", config, "train", "plant", "--epochs", "5")
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(minutes=1)
    out = cli("--config", config, "suppress", "add", "plant", "--start",
              start.isoformat(), "--end", (start + dt.timedelta(minutes=10)).isoformat(),
              "--reason", "pump swap", "--by", "ana")
    assert "monitor plant: suppression window 1 from" in out and "(all entities)" in out
    listed = cli_json("--config", config, "suppress", "list", "plant", "--json")
    assert [w["reason"] for w in listed["windows"]] == ["pump swap"]
    assert listed["recurring"][0]["timezone"] == "America/New_York"
    text = cli("--config", config, "suppress", "list", "plant")
    assert "pump swap" in text and "recurring (config):" in text and "30 1 * * *" in text
    status = cli_json("--config", config, "status", "--json")["monitors"][0]
    assert status["suppressed_now"] == []  # window 1 opens in a minute
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cli("--config", config, "suppress", "add", "plant", "--start",
        (now - dt.timedelta(hours=1)).isoformat(), "--end",
        (now + dt.timedelta(seconds=50)).isoformat())
    status = cli_json("--config", config, "status", "--json")["monitors"][0]
    assert [s["window"] for s in status["suppressed_now"]] == ["window 2"]
    assert "suppressed by window 2" in cli("--config", config, "status")
    cli("--config", config, "suppress", "remove", "2")
    ids = insert_rows(engine, table, Sensors(seed=5).anomalous(3), start=start)
    cli("--config", config, "run", "--once")
    flags = cli_json("--config", config, "anomalies", "plant", "--json")
    mine = [f for f in flags if f["source_id"] in ids]
    assert mine and {f["suppressed_by"] for f in mine} == {"window 1"}
    assert {f["incident_id"] for f in mine} == {None}
    assert "suppressed (window 1)" in cli("--config", config, "anomalies", "plant")
    assert "monitor plant: removed suppression window 1" in cli(
        "--config", config, "suppress", "remove", "1")
    assert cli_json("--config", config, "suppress", "list", "plant", "--json")["windows"] == []
    removed = cli_json("--config", config, "suppress", "list", "plant", "--removed",
                       "--json")["windows"]
    assert sorted(w["id"] for w in removed) == [1, 2] and all(w["removed_at"] for w in removed)


def test_bad_suppression_input_is_one_line_and_exit_2(workspace, tmp_path):  # noqa: F811
    config, _, _, _ = workspace
    cli("--config", config, "db", "upgrade")
    add = ["--config", config, "suppress", "add", "plant"]
    cli(*add, "--start", "2026-05-01T00:00", "--end", "2026-05-01T02:00")
    for args, message in [
        (["--start", "2026-05-02T00:00", "--end", "2026-05-01T00:00"],
         "at or before it starts"),
        (["--start", "2026-05-01T01:00", "--end", "2026-05-01T03:00"], "overlaps window 1"),
        (["--start", "2026-05-01T03:00+02:00", "--end", "2026-05-01T05:00"],
         "overlaps window 1"),  # 01:00 UTC
        (["--start", "2026-05-03", "--end", "2026-05-04", "--entity", "x"],
         "has no entity_column"),
        (["--start", "tomorrow", "--end", "2026-05-04"], "is not an ISO 8601 time"),
        (["--end", "2026-05-04"], "Missing option '--start'"),
    ]:
        out = cli(*add, *args, expect=2, stderr=True)
        assert message in out, out
        _one_line(out)
    out = cli("--config", config, "suppress", "add", "nope", "--start", "2026-05-03",
              "--end", "2026-05-04", expect=2, stderr=True)
    assert "no monitor named 'nope'" in out
    out = cli("--config", config, "suppress", "remove", "7", expect=2, stderr=True)
    assert "has no suppression window 7" in out
    _one_line(out)
    for bad, message in [
        (RECURRING.replace("30 1 * * *", "61 1 * * *"), "cron '61 1 * * *'"),
        (RECURRING.replace("30 1 * * *", "daily"), "a cron expression of five fields"),
        (RECURRING.replace("America/New_York", "Mars/Olympus"), "not a known IANA time zone"),
        (RECURRING.replace("duration_seconds = 1800", "duration_seconds = 0"),
         "duration_seconds must be a positive number"),
        (RECURRING + 'entity = "a"\n', "entity needs the monitor's entity_column"),
        (RECURRING + RECURRING, "names a window twice"),
    ]:
        path = tmp_path / "bad.toml"
        path.write_text(config.read_text().replace("[monitor.threshold]",
                                                   bad + "\n[monitor.threshold]"))
        out = cli("--config", path, "check", expect=2, stderr=True)
        assert message in out, out
        _one_line(out)
