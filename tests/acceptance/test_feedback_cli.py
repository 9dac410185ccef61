"""Feedback as an operator gives it: ``label`` flags and incidents, ``anomalies`` and
``incidents`` filter on labels, ``feedback`` shows the history, ``calibrate`` and
``train`` use the labels; bad input is a one-line error with exit code 2."""

from __future__ import annotations

from tests.acceptance.test_cli import cli, cli_json, workspace  # noqa: F401
from tests.helpers import Sensors, insert_rows


def _one_line(output: str) -> None:
    assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output


def test_label_filter_history_calibrate_and_train(workspace):  # noqa: F811
    config, engine, table, _ = workspace
    config.write_text(config.read_text().replace('label_column = "label"\n', ""))
    cli("--config", config, "train", "plant", "--epochs", "10")
    sensors = Sensors(seed=5)
    insert_rows(engine, table, sensors.normal(60))
    real = insert_rows(engine, table, sensors.anomalous(8))
    insert_rows(engine, table, sensors.normal(60))
    cli("--config", config, "run", "--once")
    flagged = cli_json("--config", config, "anomalies", "plant", "--json", "--limit", "500")
    found = cli_json("--config", config, "incidents", "plant", "--json", "--limit", "500")
    (incident,) = [i for i in found if i["first_source_id"] <= real[0] <= i["last_source_id"]]
    false_alarms = [a["source_id"] for a in flagged if a["incident_id"] != incident["id"]]

    out = cli("--config", config, "label", "plant", incident["id"], "--incident", "--tp",
              "--note", "bearing failure", "--by", "ana")
    assert f"labelled 1 incident(s) ({incident['rows']} flag(s)) tp by ana" in out
    if false_alarms:
        out = cli("--config", config, "label", "plant", *false_alarms, "--fp")
        assert f"labelled {len(false_alarms)} flag(s) fp" in out
    tp = cli_json("--config", config, "anomalies", "plant", "--label", "tp", "--json",
                  "--limit", "500")
    assert {a["source_id"] for a in tp} == {a["source_id"] for a in flagged
                                            if a["incident_id"] == incident["id"]}
    assert len({a["source_id"] for a in tp} & set(real)) >= 6
    assert all(a["label"] == "tp" and a["incident_id"] == incident["id"] for a in tp)
    assert cli_json("--config", config, "anomalies", "plant", "--label", "none",
                    "--json") == []
    listing = cli("--config", config, "anomalies", "plant", "--label", "tp")
    assert "label" in listing.splitlines()[0] and " tp " in listing
    assert "tp" in cli("--config", config, "incidents", "plant", "--label", "tp")
    shown = cli_json("--config", config, "incidents", "plant", "--label", "tp", "--json")
    assert [i["id"] for i in shown] == [incident["id"]] and shown[0]["label"] == "tp"
    history = cli_json("--config", config, "feedback", "plant", "--json")
    assert history["counts"] == {"tp": 1, "fp": len(false_alarms)}
    assert history["labels"][-1]["note"] == "bearing failure"
    assert history["precision"] is not None
    assert "bearing failure" in cli("--config", config, "feedback", "plant")

    dry = cli_json("--config", config, "calibrate", "plant", "--method", "labels",
                   "--dry-run", "--json")
    assert dry["labels_from"] == "feedback" and dry["labelled_rows"] == len(flagged)
    assert all(c["precision"] is not None for c in dry["candidates"]
               if c["recent_flagged"] or c["label"] == "current")
    out = cli("--config", config, "calibrate", "plant", "--method", "labels")
    assert "from the feedback" in out and "threshold of version 1 set to" in out
    out = cli("--config", config, "train", "plant", "--epochs", "2", "--no-activate")
    assert f"{len(tp)} left out ({len(tp)} labelled true anomalies)" in out
    out = cli("--config", config, "train", "plant", "--epochs", "2", "--no-activate",
              "--exclude-flagged")
    assert (f"{len(flagged)} left out ({len(tp)} labelled true anomalies, {len(flagged)} "
            "flagged rows)") in out


def test_bad_feedback_input_is_one_line_and_exit_2(workspace):  # noqa: F811
    config, engine, table, _ = workspace
    cli("--config", config, "train", "plant", "--epochs", "5")
    insert_rows(engine, table, Sensors(seed=5).anomalous(3))
    cli("--config", config, "run", "--once")
    (flag, *_) = cli_json("--config", config, "anomalies", "plant", "--json")
    for args, message in [
        (["label", "plant", flag["source_id"], "987654", "--fp"],
         "no flagged row with id 987654"),
        (["label", "plant", "987654", "--incident", "--tp"], "no incident with id 987654"),
        (["label", "plant", flag["source_id"]], "give one of --tp"),
        (["label", "plant", flag["source_id"], "--tp", "--fp"], "not both"),
        (["label", "plant", "--tp"], "Missing argument 'IDS...'"),
        (["label", "nope", flag["source_id"], "--tp"], "no monitor named 'nope'"),
        (["label", "plant", flag["source_id"], "--tp", "--note", "x" * 3000],
         "--note has 3000 characters"),
    ]:
        out = cli("--config", config, *args, expect=2, stderr=True)
        assert message in out, out
        _one_line(out)
    assert cli_json("--config", config, "feedback", "plant", "--json")["labels"] == []
    out = cli("--config", config, "calibrate", "plant", "--method", "labels", "--dry-run",
              expect=2, stderr=True)
    assert "held-out row" in out or "labelled a true positive" in out
    _one_line(out)
    out = cli("--config", config, "anomalies", "plant", "--label", "maybe", expect=2,
              stderr=True)
    assert "'maybe' is not one of 'tp', 'fp', 'none'" in out
