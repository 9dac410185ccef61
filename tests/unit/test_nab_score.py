"""The NAB scorer reproduces NAB's own scores of Numenta HTM's published results on the
shared files: every file's score and counts per profile, the optimised thresholds, and
the normalised 66.5 / 60.1 / 71.6."""

from __future__ import annotations

import csv
import datetime as dt

import pytest

from benchmarks import nab_score

REFERENCE = nab_score.NAB_DIR / "reference" / "numenta"
pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared NAB data not found")


@pytest.fixture(scope="module")
def htm():
    labels = nab_score.load_labels(nab_score.DEFAULT_LABELS)
    files = nab_score.load_results(REFERENCE, "numenta", labels)
    return files, nab_score.score_detector(files, sum(len(labels[n]) for n in files))


@pytest.mark.parametrize(("profile", "expected"), [
    ("standard", 66.5), ("reward_low_FP_rate", 60.1), ("reward_low_FN_rate", 71.6)])
def test_htm_scores_reproduce_nab(htm, profile, expected):
    files, results = htm
    assert len(files) == 24
    result = next(r for r in results if r.profile.name == profile)
    assert round(result.score, 1) == expected
    with (REFERENCE / f"numenta_{profile}_scores.csv").open(newline="") as handle:
        reference = {r["File"]: r for r in csv.DictReader(handle) if r["File"] in files}
    assert len(reference) == 24
    for mine in result.files:
        theirs = reference[mine.name]
        assert result.threshold == pytest.approx(float(theirs["Threshold"]), abs=1e-9)
        assert mine.score == pytest.approx(float(theirs["Score"]), abs=1e-9), mine.name
        assert (mine.tp, mine.fp, mine.fn, mine.tn) == tuple(
            int(theirs[k]) for k in ("TP", "FP", "FN", "TN")), mine.name
    assert result.raw == pytest.approx(sum(f.score for f in result.files), abs=1e-9)


def _series(n: int, window: tuple[int, int], hit: int | None):
    start = dt.datetime(2026, 1, 1)
    times = [start + dt.timedelta(minutes=5 * i) for i in range(n)]
    scores = [0.0] * n
    if hit is not None:
        scores[hit] = 1.0
    return times, scores, [(times[window[0]], times[window[1]])]


def test_a_detection_at_the_window_start_is_perfect_and_none_is_null():
    profile = nab_score.PROFILES[0]
    times, scores, windows = _series(1000, (500, 599), hit=500)
    rows = nab_score.sweep_rows("f", times, scores, windows)
    assert len(rows) == 1000 - nab_score.probation_rows(1000) == 850
    threshold, raw = nab_score.best_threshold(rows, profile)
    assert threshold == 1.0 and raw == pytest.approx(1.0)
    assert nab_score.normalised(raw, 1, profile) == pytest.approx(100.0)
    times, scores, windows = _series(1000, (500, 599), hit=None)
    rows = nab_score.sweep_rows("f", times, scores, windows)
    assert nab_score.score_file("f", rows, 0.5, profile).score == -1.0  # the window missed
    # A late detection earns less; one far from any window costs the full FP weight.
    late = nab_score.sweep_rows("f", *_series(1000, (500, 599), hit=590))
    far = nab_score.sweep_rows("f", *_series(1000, (500, 599), hit=200))
    assert nab_score.score_file("f", late, 1.0, profile).score == pytest.approx(0.248, abs=1e-3)
    assert nab_score.score_file("f", far, 1.0, profile).score == pytest.approx(-1.11)
