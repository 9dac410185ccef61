"""benchmarks.nab: a NAB file through the daemon's code path, written in NAB's format."""

from __future__ import annotations

import csv

import pytest

from benchmarks import nab, nab_score

FILE = "realAWSCloudwatch/iio_us-east-1_i-a2eb1cd9_NetworkIn.csv"
pytestmark = pytest.mark.skipif(not (nab_score.NAB_DIR / FILE).exists(),
                                reason="shared NAB data not found")


def test_a_result_file_has_every_row_scored_in_nab_format(tmp_path):
    labels = nab_score.load_labels(nab_score.DEFAULT_LABELS)
    nab.main(["--results", str(tmp_path), "--files", FILE, "--jobs", "1"])
    path = tmp_path / "realAWSCloudwatch" / f"anomalymonitor_{FILE.split('/')[1]}"
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["timestamp", "value", "anomaly_score", "label"]
        rows = list(reader)
    with (nab_score.NAB_DIR / FILE).open(newline="") as handle:
        source = list(csv.DictReader(handle))
    assert [(r["timestamp"], r["value"]) for r in rows] == \
        [(r["timestamp"], r["value"]) for r in source]
    scores = [float(r["anomaly_score"]) for r in rows]
    probation = nab_score.probation_rows(len(rows))
    assert all(s == 0 for s in scores[:probation])
    assert all(0 <= s < 1 for s in scores) and len(set(scores[probation:])) > len(rows) // 2
    windows = labels[FILE]
    inside = [any(a <= nab_score.parse_time(r["timestamp"]) <= b for a, b in windows)
              for r in rows]
    assert [r["label"] == "1" for r in rows] == inside
    # the scorer reads it back: one file's standard score is finite and above the null's
    files = nab_score.load_results(tmp_path, "anomalymonitor", labels)
    result = nab_score.score_detector(files, len(windows))[0]
    assert result.raw >= -len(windows)


def test_incident_onsets_are_the_first_flag_of_each_run():
    import datetime as dt

    times = [dt.datetime(2026, 1, 1) + dt.timedelta(minutes=5 * i) for i in range(10)]
    scores = {1: 0.1, 2: 3.0, 3: 2.5, 4: 0.2, 5: 4.0, 6: 0.1, 7: 0.1, 8: 0.1, 9: 5.0, 10: 2.1}
    # flags 2, 3, 5 (10 minutes apart at most) are one run within 15 minutes; 9, 10 another
    assert nab.incident_onsets(scores, times, 2.0, 900.0) == {2, 9}
    assert nab.incident_onsets(scores, times, 2.0, 300.0) == {2, 5, 9}
