"""Drift math: the training reference's bins, PSI, and decayed counts."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_monitor.drift import (
    DRIFT_LEVEL,
    DRIFT_MIN_ROWS,
    DRIFT_WINDOW_ROWS,
    DriftState,
    bin_counts,
    psi,
    reference_of,
)


def _reference(seed: int = 0, n: int = 5000):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n, 3))
    values[:, 2] = 7.0  # a constant feature
    return reference_of(values, ["a", "b", "c"], rng.normal(size=n)), rng


def test_deciles_hold_a_tenth_each_and_ties_collapse():
    reference, _ = _reference()
    a = reference["features"]["a"]
    assert len(a["edges"]) == 9 and a["shares"] == pytest.approx([0.1] * 10, abs=1e-3)
    c = reference["features"]["c"]  # all values tie: one edge, everything at or below it
    assert c["edges"] == [7.0] and c["shares"] == [1.0, 0.0]


def test_psi_is_near_zero_for_the_same_distribution_and_large_after_a_shift():
    reference, rng = _reference()
    bins = reference["features"]["a"]
    same = bin_counts(rng.normal(size=2000), bins["edges"])
    shifted = bin_counts(rng.normal(size=2000) + 1.0, bins["edges"])
    assert psi(bins["shares"], same) < 0.02
    assert psi(bins["shares"], shifted) > 3 * DRIFT_LEVEL  # a shift of one sd: about 0.9
    # A constant feature that moves: every row lands in the empty bin.
    c = reference["features"]["c"]
    assert psi(c["shares"], bin_counts(np.full(100, 7.5), c["edges"])) > 5
    assert psi(c["shares"], bin_counts(np.full(100, 7.0), c["edges"])) == 0.0
    assert psi(bins["shares"], np.zeros(10)) == 0.0  # nothing seen: no drift


def test_non_finite_values_are_not_counted():
    assert bin_counts([np.nan, np.inf, 0.0, 2.0], [1.0]).tolist() == [1.0, 1.0]


def test_counts_decay_so_that_recent_rows_decide():
    reference, rng = _reference()
    state = DriftState(1)
    values = rng.normal(size=(DRIFT_MIN_ROWS - 1, 3))
    values[:, 2] = 7.0
    state.add(reference, values, ["a", "b", "c"], rng.normal(size=len(values)), 5)
    assert not state.report(reference, 0.01).measured  # too few rows to mean much
    calm = np.column_stack([rng.normal(size=(2 * DRIFT_WINDOW_ROWS, 2)),
                            np.full(2 * DRIFT_WINDOW_ROWS, 7.0)])
    for chunk in np.array_split(calm, 8):
        state.add(reference, chunk, ["a", "b", "c"], rng.normal(size=len(chunk)), 0)
    report = state.report(reference, 0.01)
    assert report.measured and not report.drifting and report.drift_score < 0.05
    shifted = calm + np.array([1.5, 0.0, 0.0])
    for chunk in np.array_split(shifted, 8):
        state.add(reference, chunk, ["a", "b", "c"], rng.normal(size=len(chunk)), 0)
    report = state.report(reference, 0.01)
    assert report.drifted == ["a"] and report.drifting and report.features["b"] < 0.05
    assert report.flag_share == pytest.approx(0.0, abs=1e-3)  # decayed away
    assert state.rows == DRIFT_MIN_ROWS - 1 + 4 * DRIFT_WINDOW_ROWS
