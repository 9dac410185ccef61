"""Thresholds and severities on score distributions whose quantiles are known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from anomaly_monitor.calibration import (
    DEFAULT_METHOD,
    CalibrationWarning,
    FewScoresWarning,
    SeverityScale,
    calibrate,
    fit_pareto_tail,
    fit_robust,
    fpr_for_alerts_per_day,
    labels_threshold,
    pot_threshold,
    quantile_threshold,
    robust_threshold,
)
from anomaly_monitor.config import ThresholdSettings

#: Clean held-out score distributions of typical shapes: reconstruction errors are
#: chi-square-like with as many degrees of freedom as features, arbitrarily scaled.
SHAPES = {
    "chi2 2 dof": stats.chi2(2, scale=0.3),
    "chi2 8 dof": stats.chi2(8, scale=0.05),
    "chi2 64 dof": stats.chi2(64, scale=7.0),
    "chi2 32 dof, tiny": stats.chi2(32, scale=1e-3),
    "lognormal": stats.lognorm(1.0, scale=0.2),
    "gamma": stats.gamma(3.0, scale=2.0),
}


def contaminate(clean: np.ndarray, shape, rng: np.random.Generator, share: float = 0.07):
    """``clean`` plus anomalies (``share`` of the result) 10-100x its 99.9% quantile."""
    n = round(clean.size * share / (1 - share))
    anomalies = shape.isf(1e-3) * rng.uniform(10, 100, n)
    return np.r_[clean, anomalies], anomalies


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
        ({"method": "zscore"}, "method must be one of robust, quantile, pot, labels, fixed"),
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


# -- robust ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHAPES)
def test_robust_realises_about_the_target_rate_on_clean_scores(name):
    shape = SHAPES[name]
    clean = shape.rvs(size=5000, random_state=np.random.default_rng(11))
    fpr = shape.sf(robust_threshold(clean, 0.01))
    # Measured: 0.0056 (chi2 2), 0.0076 (8), 0.0082 (64), 0.0081 (32), 0.0152 (lognormal),
    # 0.0070 (gamma): within a factor 2 of the target, mostly on the conservative side.
    assert 0.004 <= fpr <= 0.02


@pytest.mark.parametrize("name", SHAPES)
def test_robust_threshold_barely_moves_with_seven_percent_anomalies(name):
    shape = SHAPES[name]
    rng = np.random.default_rng(11)
    clean = shape.rvs(size=5000, random_state=rng)
    mixed, anomalies = contaminate(clean, shape, rng)
    before = robust_threshold(clean, 0.01)
    threshold = calibrate(mixed, "robust", target_fpr=0.01)
    # Measured: at most a 5.5% shift (lognormal), the others under 4%.
    assert threshold.value == pytest.approx(before, rel=0.10)
    assert (anomalies > threshold.value).mean() >= 0.99
    assert threshold.params["contamination"] == pytest.approx(0.07, abs=0.01)
    # The quantile method takes the anomalies for normal rows: its threshold jumps ~100x.
    assert quantile_threshold(mixed, 0.01) > 10 * quantile_threshold(clean, 0.01)


def test_robust_is_the_default_method():
    scores = np.random.default_rng(4).chisquare(6, 1000)
    assert DEFAULT_METHOD == "robust" == ThresholdSettings().method
    threshold = calibrate(scores, target_fpr=0.01)
    assert threshold.method == "robust" and threshold.params["target_fpr"] == 0.01
    assert set(threshold.params) == {"target_fpr", "contamination", "power"}
    assert 0.0 <= threshold.params["power"] <= 1.0


@pytest.mark.parametrize(
    "scores",
    [np.zeros(10), np.r_[np.zeros(6), [1.0, 2.0, 3.0, 4.0]], np.r_[np.ones(100), [2.0] * 5],
     np.array([3.0]), np.array([-1.0, -2.0, 5.0])],
    ids=["all zero", "mostly zero", "ties", "one row", "negative median"],
)
def test_robust_without_a_bulk_falls_back_to_quantile(scores):
    assert fit_robust(scores) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        threshold = calibrate(scores, "robust", target_fpr=0.01)
        assert threshold.value == quantile_threshold(scores, 0.01)
    assert "robust falls back to the quantile method" in str(caught[0].message)
    assert "contamination" not in threshold.params


def test_robust_on_tiny_sets_zeros_and_quantised_scores_is_finite_and_above_the_median():
    rng = np.random.default_rng(5)
    for scores in (rng.chisquare(6, 10), np.array([1.0, 2.0]),
                   np.r_[np.zeros(300), rng.chisquare(6, 700)], np.round(rng.chisquare(4, 500)),
                   rng.chisquare(4, 200) * 1e300, rng.chisquare(4, 200) * 1e-300):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numerical warnings; only the few-rows one
            warnings.simplefilter("ignore", FewScoresWarning)
            value = robust_threshold(scores, 0.01)
        assert math.isfinite(value) and value > np.median(scores)


@settings(max_examples=60, deadline=None)
@given(scores=arrays(np.float64, st.integers(1, 300), elements=st.floats(0, 1e6)))
def test_robust_never_fails_on_non_negative_scores(scores):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        threshold = calibrate(scores, "robust", target_fpr=0.01)
    assert math.isfinite(threshold.value) and threshold.value >= 0


# -- severity past the held-out scores ---------------------------------------------------

@pytest.mark.parametrize("n", [60, 300, 3000])
@pytest.mark.parametrize("name", ["chi2 8 dof", "lognormal"])
def test_severity_spans_the_scale_whatever_the_held_out_size(n, name):
    scores = SHAPES[name].rvs(size=n, random_state=np.random.default_rng(n))
    scale = SeverityScale.fit(scores)
    p99, top = np.quantile(scores, 0.99), scores.max()
    median, at_top, beyond = scale.severity([np.median(scores), top, 1000 * p99])
    assert median < 15  # 5: half the normal rows score higher
    assert at_top < 99  # 30 (60 rows), 41 (300), about 60 (3000)
    assert beyond >= 99
    grid = np.geomspace(1e-3 * np.median(scores), 1e4 * top, 2000)
    severity = scale.severity(grid)
    assert (np.diff(severity) >= -1e-9).all() and ((severity >= 0) & (severity <= 100)).all()
    assert scale.severity([2 * top])[0] > at_top  # it keeps rising past the held-out scores


def test_severity_of_contaminated_holdout_still_reaches_the_top():
    shape = SHAPES["chi2 8 dof"]
    rng = np.random.default_rng(7)
    mixed, _ = contaminate(shape.rvs(size=287, random_state=rng), shape, rng)
    scale = SeverityScale.fit(mixed)
    threshold = robust_threshold(mixed, 0.01)
    assert scale.severity([24_000 * threshold])[0] >= 99  # the row: 41 before
    assert scale.severity([np.median(mixed)])[0] < 15


def test_severity_scale_round_trips_its_robust_fit_and_reads_old_dicts():
    scores = SHAPES["chi2 8 dof"].rvs(size=300, random_state=np.random.default_rng(8))
    scale = SeverityScale.fit(scores)
    state = scale.to_dict()
    assert state["robust"] is not None and scale.robust is not None
    again = SeverityScale.from_dict(state)
    x = np.geomspace(1e-3, 1e3, 300)
    np.testing.assert_array_equal(again.severity(x), scale.severity(x))
    # A scale stored before the robust fit existed gets it from its quantile grid (for
    # 300 scores the grid is the scores themselves), so it extrapolates as a new one.
    old = SeverityScale.from_dict({k: v for k, v in state.items() if k != "robust"})
    assert old.robust is not None
    np.testing.assert_allclose(old.severity(x), scale.severity(x), rtol=1e-9, atol=1e-9)
    assert old.severity([1000 * scores.max()])[0] >= 99
    # One stored with robust = None (no usable bulk) stays capped past its largest score.
    capped = SeverityScale.from_dict({**state, "robust": None})
    top = capped.severity([scores.max(), 1000 * scores.max()])
    assert top[0] == top[1] == pytest.approx(100 * math.log10(301) / 6)


def test_choose_threshold_turns_alerts_per_day_into_the_robust_target():
    from anomaly_monitor.lifecycle import choose_threshold

    scores = SHAPES["chi2 8 dof"].rvs(size=2000, random_state=np.random.default_rng(9))
    settings = ThresholdSettings(method="robust", alerts_per_day=10)
    threshold = choose_threshold(scores, settings, rows_per_day=1000)
    assert threshold.method == "robust" and threshold.params["alerts_per_day"] == 10
    assert threshold.params["target_fpr"] == pytest.approx(0.01)
    assert threshold.value == robust_threshold(scores, 0.01)


def test_robust_on_few_rows_warns_but_calibrates():
    from anomaly_monitor.lifecycle import choose_threshold

    scores = SHAPES["chi2 8 dof"].rvs(size=20, random_state=np.random.default_rng(3))
    with pytest.warns(FewScoresWarning, match="only 20 held-out scores"):
        value = robust_threshold(scores, 0.01)
    chosen = choose_threshold(scores, ThresholdSettings(method="robust"))
    assert chosen.value == value and "fallback" not in chosen.params
    assert "only 20 held-out scores" in chosen.params["warning"]
