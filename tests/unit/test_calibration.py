"""Thresholds and severities on score distributions whose quantiles are known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anomaly_monitor.calibration import (
    CalibrationWarning,
    SeverityScale,
    calibrate,
    fit_pareto_tail,
    fpr_for_alerts_per_day,
    labels_threshold,
    pot_threshold,
    quantile_threshold,
)


@pytest.fixture(scope="module")
def exponential() -> np.ndarray:
    return np.random.default_rng(0).exponential(size=100_000)


@pytest.mark.parametrize("fpr", [0.1, 0.01])
def test_quantile_matches_target_rate(exponential, fpr):
    threshold = quantile_threshold(exponential, fpr)
    assert (exponential > threshold).mean() == pytest.approx(fpr, rel=0.02)
    assert threshold == pytest.approx(-math.log(fpr), rel=0.03)


@pytest.mark.parametrize("fpr", [1e-4, 1e-5, 1e-6])
def test_pot_on_exponential_is_within_ten_percent(exponential, fpr):
    assert pot_threshold(exponential, fpr) == pytest.approx(-math.log(fpr), rel=0.10)


def test_pot_on_pareto_tail_is_within_ten_percent():
    # Lomax(a=3): P(S > s) = (1 + s)^-3, a heavy tail with GPD shape 1/3.
    scores = np.random.default_rng(1).pareto(3.0, size=200_000)
    fpr = 1e-5
    truth = fpr ** (-1 / 3) - 1
    assert pot_threshold(scores, fpr) == pytest.approx(truth, rel=0.10)
    tail = fit_pareto_tail(scores)
    assert tail is not None and tail.shape == pytest.approx(1 / 3, abs=0.1)


def test_pot_falls_back_to_quantile_with_a_warning():
    scores = np.random.default_rng(2).exponential(size=300)
    with pytest.warns(CalibrationWarning, match="too few peaks"):
        threshold = pot_threshold(scores, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert threshold == quantile_threshold(scores, 0.05)


def test_quantile_warns_when_the_rate_is_below_resolution():
    with pytest.warns(CalibrationWarning, match="cannot resolve"):
        assert quantile_threshold(np.arange(100.0), 1e-4) == pytest.approx(99.0, abs=0.01)


def test_labels_threshold_separates_perfectly_separable_scores():
    scores = np.r_[np.linspace(0, 1, 90), np.linspace(2, 3, 10)]
    labels = np.r_[np.zeros(90), np.ones(10)]
    threshold = labels_threshold(scores, labels)
    assert 1.0 < threshold < 2.0
    assert ((scores > threshold) == labels.astype(bool)).all()


def test_labels_threshold_maximises_f1_with_overlap_and_ties():
    rng = np.random.default_rng(3)
    scores = np.round(np.r_[rng.normal(0, 1, 2000), rng.normal(2.5, 1, 100)], 1)
    labels = np.r_[np.zeros(2000), np.ones(100)]
    threshold = labels_threshold(scores, labels)

    def f1(t: float) -> float:
        flagged = scores > t
        tp = (flagged & (labels == 1)).sum()
        return 2 * tp / (flagged.sum() + labels.sum())

    best = max(f1(t) for t in np.unique(scores) - 1e-9)
    assert f1(threshold) == pytest.approx(best)


def test_labels_threshold_needs_anomalies():
    with pytest.raises(ValueError, match="no anomaly"):
        labels_threshold([1.0, 2.0], [0, 0])
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        labels_threshold([1.0, 2.0], [0, 2])


def test_calibrate_dispatches_and_reports_the_flag_rate(exponential):
    threshold = calibrate(exponential, "quantile", target_fpr=0.01)
    assert threshold.method == "quantile" and threshold.params == {"target_fpr": 0.01}
    assert threshold.calibration_flag_rate == pytest.approx(0.01, rel=0.02)
    assert calibrate(exponential, "fixed", value=3.5).value == 3.5
    assert calibrate([0.0, 1.0, 5.0], "labels", labels=[0, 0, 1]).value == 3.0
    assert calibrate(exponential, "pot", target_fpr=1e-4).to_dict()["method"] == "pot"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "zscore"}, "method must be one of quantile, pot, labels, fixed"),
        ({"method": "quantile"}, "needs target_fpr"),
        ({"method": "pot", "target_fpr": 1.5}, r"target_fpr must be in \(0, 1\)"),
        ({"method": "labels"}, "needs labels"),
        ({"method": "fixed", "value": float("nan")}, "needs a finite value"),
    ],
)
def test_calibrate_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate([1.0, 2.0, 3.0], **kwargs)


def test_scores_must_be_finite():
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        quantile_threshold([1.0, np.nan], 0.1)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        quantile_threshold([], 0.1)


def test_alerts_per_day():
    assert fpr_for_alerts_per_day(5, 86_400) == pytest.approx(5 / 86_400)
    with pytest.raises(ValueError, match="not below"):
        fpr_for_alerts_per_day(100, 50)


def test_severity_follows_tail_probability(exponential):
    scale = SeverityScale.fit(exponential)
    median, p01, p1e6 = -math.log(0.5), -math.log(0.01), -math.log(1e-6)
    severity = scale.severity([median, p01, p1e6, 100.0])
    assert severity[0] == pytest.approx(100 * math.log10(2) / 6, abs=0.5)
    assert severity[1] == pytest.approx(100 * 2 / 6, abs=1.0)
    # Extrapolated 20x beyond the 2% tail: within a factor of 3 of the truth (1e-6).
    assert 1e-6 / 3 < scale.tail_probability([p1e6])[0] < 3e-6
    assert severity[2] > 90.0
    assert severity[3] == 100.0
    assert scale.severity([-5.0])[0] == 0.0


def test_severity_beyond_calibration_is_extrapolated_not_capped(exponential):
    scale = SeverityScale.fit(exponential)
    top = exponential.max()
    s = scale.severity([top + 0.5, top + 1.5, top + 2.5])
    assert s[0] < s[1] < s[2] <= 100.0


def test_severity_scale_round_trips(exponential):
    scale = SeverityScale.fit(exponential[:5000])
    again = SeverityScale.from_dict(scale.to_dict())
    x = np.linspace(-1, 20, 200)
    np.testing.assert_array_equal(again.severity(x), scale.severity(x))


@settings(max_examples=60, deadline=None)
@given(
    calibration=arrays(np.float64, st.integers(1, 400),
                       elements=st.floats(-1e6, 1e6, allow_nan=False)),
    probes=arrays(np.float64, st.integers(2, 50), elements=st.floats(-2e6, 2e6, allow_nan=False)),
)
def test_severity_is_bounded_and_monotone(calibration, probes):
    scale = SeverityScale.fit(calibration)
    probes = np.sort(probes)
    severity = scale.severity(probes)
    assert ((severity >= 0) & (severity <= 100)).all()
    assert (np.diff(severity) >= -1e-9).all()
