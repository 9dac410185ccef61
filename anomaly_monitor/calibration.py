"""Thresholds and severities from anomaly scores: pure functions, no I/O.

Scores follow the detectors' convention (higher = more anomalous) and a row is
flagged when ``score > threshold``. Calibration scores are the scores of
recent rows held out from training. History is never clean, so the default
method (``DEFAULT_METHOD``) does not assume that they are all normal.

Methods and their assumptions:

``robust`` (the default)
    Fits the bulk of the calibration scores and sets the threshold at the
    score a normal row exceeds with probability ``target_fpr`` under that fit.
    The fit is a Box-Cox power transform (power in [0, 1]: 0 is the log, about
    1/3 suits chi-square-like reconstruction errors) followed by a normal
    distribution, fitted by regressing the transformed empirical quantiles at
    levels ``ROBUST_LEVELS`` (the 10% to 80% quantiles) on normal quantiles.
    The power is the smallest whose misfit is within ``ROBUST_POWER_TOLERANCE``
    times the best one's (the heavier tail when the bulk cannot tell them
    apart: slightly conservative). The share of scores above the fit's
    ``1 - ROBUST_OUTLIER_RATE`` quantile, beyond that rate, estimates the
    contamination ``c``; the fit is repeated with the empirical levels mapped to
    ``level / (1 - c)``, as anomalies above the bulk shift them. Assumes that the
    normal rows' scores are unimodal and positive with a smooth tail of the
    Box-Cox-normal family, and that anomalies (at most ``MAX_CONTAMINATION`` of
    the rows) score above the bulk; their number does not move the threshold.
    Scores below ``ROBUST_FLOOR_FRACTION`` of the median count as that floor
    (zeros, ties). Falls back to ``quantile`` with a warning when more than half
    the scores are zero or the bulk has no spread.
``quantile``
    The threshold is the empirical ``1 - target_fpr`` quantile of the
    calibration scores. Assumes future normal rows score like the calibration
    rows (no drift) and that there are well over ``1 / target_fpr`` of them;
    for rarer targets the estimate rests on a handful of rows, so use ``pot``.
``pot``
    Peaks over threshold (Siffer et al., KDD 2017): the excesses over a high
    initial quantile ``t`` follow a generalized Pareto distribution (GPD) for
    any reasonable score distribution (Pickands-Balkema-de Haan); the GPD fitted
    by maximum likelihood is solved for the score exceeded with probability
    ``target_fpr``. Assumes the tail is smooth and the peaks independent; needs
    at least ``MIN_POT_PEAKS`` peaks, else it falls back to ``quantile`` with a
    warning. Extrapolates to rates far below ``1 / n``.
``labels``
    Given 0/1 labels for the calibration rows, the threshold that maximises
    F1. Assumes the labels are right and the anomaly rate stays as labelled.
``fixed``
    A value chosen by the operator; nothing is assumed.

Severity (0-100) maps the tail probability ``p`` of a score under the
calibration scores to ``100 * min(1, -log10(p) / SEVERITY_DECADES)``: a score
exceeded by half of the normal rows is 5, one in a hundred 33, one in a
million (or rarer) 100. Within the calibration scores ``p`` is empirical
(at least ``1 / (n + 1)``), above the POT initial quantile also the GPD fit of
``pot`` where it could be fitted. Past the largest calibration score ``p``
keeps falling as the ``robust`` fit's survival does, from its value there, so a
score far beyond every calibration score reaches 100 whatever their number.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

METHODS: tuple[str, ...] = ("robust", "quantile", "pot", "labels", "fixed")
#: The threshold method of new configs: it tolerates anomalies in the held-out rows.
DEFAULT_METHOD = "robust"
#: The methods that take a target false-positive rate (or alerts per day).
RATE_METHODS: tuple[str, ...] = ("robust", "quantile", "pot")
#: Empirical quantile levels of the calibration scores that ``robust`` fits (the bulk:
#: below every anomaly while at most MAX_CONTAMINATION of the rows are anomalies).
ROBUST_LEVELS: tuple[float, ...] = tuple(np.linspace(0.10, 0.80, 36).tolist())
#: ``robust`` counts scores below this fraction of the median as this fraction (zeros).
ROBUST_FLOOR_FRACTION = 1e-3
#: The fewest distinct bulk quantiles above the floor that ``robust`` fits a line to.
MIN_ROBUST_LEVELS = 3
#: Below this many held-out scores the robust threshold is computed but warned about.
MIN_ROBUST_ROWS = 50
#: Step of the coarse grid of Box-Cox powers in [0, 1] searched before refining.
ROBUST_POWER_STEP = 0.05
#: ``robust`` takes the smallest power (heaviest tail) whose misfit (1 - correlation of
#: transformed and normal quantiles) is within this factor of the best power's.
ROBUST_POWER_TOLERANCE = 1.25
#: Absolute slack on that misfit, for bulks that fit (almost) exactly.
ROBUST_MISFIT_SLACK = 1e-6
#: Scores above the fit's quantile at this tail probability count toward contamination.
ROBUST_OUTLIER_RATE = 1e-3
#: The largest share of anomalies among the calibration rows that ``robust`` corrects for.
MAX_CONTAMINATION = 0.15
#: Rounds of refitting with the contamination estimate (it converges in two or three).
ROBUST_ITERATIONS = 5
#: Thresholds from a fit are capped at exp(MAX_LOG_SCORE) (far below float overflow).
MAX_LOG_SCORE = 700.0
#: Initial quantile above which POT fits its generalized Pareto tail.
POT_INITIAL_QUANTILE = 0.98
#: The fewest peaks over the initial quantile that POT fits a tail to.
MIN_POT_PEAKS = 20
#: Tail probabilities at or below 10**-SEVERITY_DECADES map to severity 100.
SEVERITY_DECADES = 6.0
#: Quantile levels kept in a serialised severity scale (bounds its size).
SEVERITY_GRID_POINTS = 1001

Scores = npt.ArrayLike


class CalibrationWarning(UserWarning):
    """Calibration fell back to a simpler method or rests on few rows."""


class FewScoresWarning(CalibrationWarning):
    """Calibration used its method but rests on too few rows to be trusted."""


@dataclass(frozen=True)
class Threshold:
    """A calibrated threshold: flag rows whose score is above ``value``."""

    value: float
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    #: Fraction of the calibration scores above ``value``.
    calibration_flag_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return asdict(self)


def _check_scores(scores: Scores, what: str = "scores") -> npt.NDArray[np.float64]:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array; got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{what} contain {bad} NaN or infinite values")
    return array


def _check_rate(target_fpr: float) -> float:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1); got {target_fpr!r}")
    return float(target_fpr)


def quantile_threshold(scores: Scores, target_fpr: float) -> float:
    """The empirical ``1 - target_fpr`` quantile of the calibration scores."""
    array = _check_scores(scores)
    rate = _check_rate(target_fpr)
    if array.size * rate < 1.0:
        warnings.warn(
            f"{array.size} calibration scores cannot resolve target_fpr={rate:g}; "
            "the threshold is their maximum (consider method 'pot')",
            CalibrationWarning, stacklevel=2,
        )
    return float(np.quantile(array, 1.0 - rate))


@dataclass(frozen=True)
class ParetoTail:
    """A generalized Pareto fit of the excesses over ``threshold``.

    ``tail_rate`` is the fraction of all calibration scores above ``threshold``.
    """

    threshold: float
    shape: float
    scale: float
    tail_rate: float

    def survival(self, score: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """P(S > score) for scores at or above ``threshold``."""
        excess = np.maximum(score - self.threshold, 0.0)
        if abs(self.shape) < 1e-9:
            return self.tail_rate * np.exp(-excess / self.scale)
        base = np.maximum(1.0 + self.shape * excess / self.scale, 0.0)
        with np.errstate(divide="ignore"):
            return self.tail_rate * np.power(base, -1.0 / self.shape)

    def quantile(self, rate: float) -> float:
        """The score exceeded with probability ``rate`` (``rate`` <= ``tail_rate``)."""
        ratio = rate / self.tail_rate
        if abs(self.shape) < 1e-9:
            return self.threshold - self.scale * math.log(ratio)
        return self.threshold + self.scale / self.shape * (ratio ** (-self.shape) - 1.0)


def fit_pareto_tail(
    scores: Scores, initial_quantile: float = POT_INITIAL_QUANTILE, min_peaks: int = MIN_POT_PEAKS
) -> ParetoTail | None:
    """Fit a GPD to the excesses over the ``initial_quantile``; ``None`` if too few peaks."""
    from scipy import stats

    array = _check_scores(scores)
    t = float(np.quantile(array, initial_quantile))
    peaks = array[array > t] - t
    if peaks.size < min_peaks or np.ptp(peaks) <= 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shape, _, scale = stats.genpareto.fit(peaks, floc=0.0)
    if not (np.isfinite(shape) and np.isfinite(scale) and scale > 0):
        return None
    return ParetoTail(t, float(shape), float(scale), peaks.size / array.size)


def pot_threshold(
    scores: Scores,
    target_fpr: float,
    *,
    initial_quantile: float = POT_INITIAL_QUANTILE,
    min_peaks: int = MIN_POT_PEAKS,
) -> float:
    """The score exceeded with probability ``target_fpr`` under a GPD tail fit.

    Falls back to :func:`quantile_threshold` with a ``CalibrationWarning`` when
    fewer than ``min_peaks`` scores exceed the initial quantile, or when the
    target rate is not inside the fitted tail.
    """
    rate = _check_rate(target_fpr)
    tail = fit_pareto_tail(scores, initial_quantile, min_peaks)
    if tail is None or rate > tail.tail_rate:
        reason = ("too few peaks over the initial quantile" if tail is None
                  else f"target_fpr {rate:g} is above the tail's rate {tail.tail_rate:g}")
        warnings.warn(f"POT falls back to the quantile method: {reason}",
                      CalibrationWarning, stacklevel=2)
        return quantile_threshold(scores, rate)
    return tail.quantile(rate)


@dataclass(frozen=True)
class RobustFit:
    """A normal fit of Box-Cox transformed scores, from the bulk of the calibration scores.

    ``transform(s) = (u ** power - 1) / power`` (``log(u)`` when ``power`` is 0),
    with ``u = max(s / reference, ROBUST_FLOOR_FRACTION)`` and ``reference`` the
    median calibration score, is normal with mean ``location`` and standard
    deviation ``scale`` for normal rows. ``contamination`` is the estimated share
    of calibration scores that are not (above the bulk).
    """

    power: float
    reference: float
    location: float
    scale: float
    contamination: float

    def transform(self, scores: Scores) -> npt.NDArray[np.float64]:
        """The Box-Cox transform of ``scores`` relative to ``reference``, floored."""
        relative = np.asarray(scores, dtype=np.float64) / self.reference
        return _box_cox(np.maximum(relative, ROBUST_FLOOR_FRACTION), self.power)

    def log_survival(self, scores: Scores) -> npt.NDArray[np.float64]:
        """log P(S > score) for a normal row (natural log, finite far into the tail)."""
        from scipy.stats import norm

        return np.asarray(norm.logsf((self.transform(scores) - self.location) / self.scale),
                          dtype=np.float64)

    def quantile(self, rate: float) -> float:
        """The score a normal row exceeds with probability ``rate``."""
        from scipy.stats import norm

        t = self.location + self.scale * float(norm.isf(rate))
        if self.power == 0.0:
            log_relative = t
        elif 1.0 + self.power * t > 0:
            log_relative = math.log1p(self.power * t) / self.power
        else:
            return 0.0
        return self.reference * math.exp(min(log_relative, MAX_LOG_SCORE))


def _box_cox(x: npt.NDArray[np.float64], power: float) -> npt.NDArray[np.float64]:
    """``(x ** power - 1) / power``, the log at power 0; ``x`` must be positive."""
    if power == 0.0:
        return np.log(x)
    return np.expm1(power * np.log(x)) / power


def _misfit(quantiles: npt.NDArray[np.float64], z: npt.NDArray[np.float64],
            power: float) -> float:
    """1 - correlation of transformed quantiles with normal quantiles (0 = a perfect line)."""
    with np.errstate(over="ignore", invalid="ignore"):  # extreme ranges: not finite
        t = _box_cox(quantiles, power)
        if not np.isfinite(t).all() or np.ptp(t) <= 0:
            return 1.0
        misfit = float(1.0 - np.corrcoef(t, z)[0, 1])
    return misfit if math.isfinite(misfit) else 1.0


def _choose_power(quantiles: npt.NDArray[np.float64], z: npt.NDArray[np.float64]) -> float:
    """The smallest power in [0, 1] whose misfit is within tolerance of the best one's."""
    from scipy.optimize import brentq, minimize_scalar

    def misfit(power: float) -> float:
        return _misfit(quantiles, z, power)

    grid = np.arange(0.0, 1.0 + ROBUST_POWER_STEP / 2, ROBUST_POWER_STEP)
    misfits = np.array([misfit(p) for p in grid])
    k = int(np.argmin(misfits))
    refined = minimize_scalar(misfit, bounds=(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]),
                              method="bounded", options={"xatol": 1e-4})
    best, best_misfit = ((float(refined.x), float(refined.fun)) if refined.fun <= misfits[k]
                         else (float(grid[k]), float(misfits[k])))
    limit = ROBUST_POWER_TOLERANCE * best_misfit + ROBUST_MISFIT_SLACK
    if misfits[0] <= limit:
        return 0.0
    # The root between the best power and the grid power below it nearest outside the limit.
    low = float(max(p for p, m in zip(grid, misfits, strict=True) if p < best and m > limit))
    return float(brentq(lambda p: misfit(p) - limit, low, best, xtol=1e-4))


def _fit_bulk(
    relative: npt.NDArray[np.float64], contamination: float
) -> tuple[float, float, float]:
    """Power, location and scale of the bulk of floored scores relative to their median.

    Levels whose quantile is the floor (zeros, ties at the bottom) are left out:
    they say only that the score is at most the floor.
    """
    from scipy.stats import norm

    levels = np.asarray(ROBUST_LEVELS)
    quantiles = np.quantile(relative, levels)
    above = quantiles > ROBUST_FLOOR_FRACTION
    levels, quantiles = levels[above], quantiles[above]
    z = norm.ppf(levels / (1.0 - contamination))
    power = _choose_power(quantiles, z)
    with np.errstate(over="ignore", invalid="ignore"):  # checked by the caller
        scale, location = np.polyfit(z, _box_cox(quantiles, power), 1)
    return power, float(location), float(scale)


def fit_robust(scores: Scores) -> RobustFit | None:
    """The :class:`RobustFit` of calibration scores; ``None`` when they have no usable bulk.

    There is no usable bulk when the median is not positive (more than half the
    scores are zero) or fewer than ``MIN_ROBUST_LEVELS`` distinct quantiles of
    the bulk are above the floor (ties).
    """
    array = _check_scores(scores)
    reference = float(np.median(array))
    if not reference > 0:
        return None
    with np.errstate(over="ignore"):
        relative = np.maximum(array / reference, ROBUST_FLOOR_FRACTION)
    if not np.isfinite(relative).all():  # a subnormal median
        return None
    bulk = np.quantile(relative, ROBUST_LEVELS)
    if np.unique(bulk[bulk > ROBUST_FLOOR_FRACTION]).size < MIN_ROBUST_LEVELS:
        return None
    contamination, fit = 0.0, None
    for _ in range(ROBUST_ITERATIONS):
        power, location, scale = _fit_bulk(relative, contamination)
        if not (math.isfinite(location) and math.isfinite(scale) and scale > 0):
            return None
        fit = RobustFit(power, reference, location, scale, contamination)
        above = float((array > fit.quantile(ROBUST_OUTLIER_RATE)).mean())
        estimate = min(MAX_CONTAMINATION,
                       max(0.0, (above - ROBUST_OUTLIER_RATE) / (1.0 - ROBUST_OUTLIER_RATE)))
        if abs(estimate - contamination) < 0.5 / array.size:
            break
        contamination = estimate
    return fit


def robust_threshold(scores: Scores, target_fpr: float) -> float:
    """The score exceeded with probability ``target_fpr`` under the :func:`fit_robust` fit.

    Falls back to :func:`quantile_threshold` with a ``CalibrationWarning`` when the
    scores have no usable bulk (see :func:`fit_robust`).
    """
    return _robust_calibration(scores, target_fpr)[0]


def _robust_calibration(scores: Scores, target_fpr: float) -> tuple[float, dict[str, Any]]:
    """The ``robust`` threshold and what it records about its fit (nothing on fallback)."""
    rate = _check_rate(target_fpr)
    fit = fit_robust(scores)
    if fit is None:
        warnings.warn("robust falls back to the quantile method: the scores have no "
                      "positive, spread-out bulk", CalibrationWarning, stacklevel=3)
        return quantile_threshold(scores, rate), {}
    n_scores = np.asarray(scores).size
    if n_scores < MIN_ROBUST_ROWS:
        warnings.warn(f"the robust threshold rests on only {n_scores} held-out scores and is "
                      f"uncertain; hold out at least {MIN_ROBUST_ROWS} rows",
                      FewScoresWarning, stacklevel=3)
    return fit.quantile(rate), {"contamination": round(fit.contamination, 6),
                                "power": round(fit.power, 4)}


def labels_threshold(scores: Scores, labels: npt.ArrayLike) -> float:
    """The threshold that maximises F1 on labelled calibration rows (1 = anomaly)."""
    array = _check_scores(scores)
    truth = np.asarray(labels)
    if truth.shape != array.shape:
        raise ValueError(f"labels have shape {truth.shape}; scores have {array.shape}")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomaly)")
    positives = int(truth.sum())
    if positives == 0:
        raise ValueError("labels contain no anomaly (1); F1 cannot be maximised")
    order = np.argsort(-array, kind="stable")
    ranked, hits = array[order], np.cumsum(truth[order])
    # Only cut where the next score differs: tied rows are flagged together.
    cuts = np.flatnonzero(np.r_[ranked[1:] < ranked[:-1], True])
    flagged = cuts + 1
    f1 = 2.0 * hits[cuts] / (flagged + positives)
    best = int(cuts[int(np.argmax(f1))])
    if best + 1 == array.size:
        return float(np.nextafter(ranked[best], -np.inf))
    return float((ranked[best] + ranked[best + 1]) / 2.0)


def fpr_for_alerts_per_day(alerts_per_day: float, rows_per_day: float) -> float:
    """The false-positive rate that gives ``alerts_per_day`` at ``rows_per_day``."""
    if alerts_per_day <= 0 or rows_per_day <= 0:
        raise ValueError("alerts_per_day and rows_per_day must be positive")
    if alerts_per_day >= rows_per_day:
        raise ValueError(
            f"{alerts_per_day:g} alerts per day is not below the {rows_per_day:g} rows per day"
        )
    return alerts_per_day / rows_per_day


def calibrate(
    scores: Scores,
    method: str = DEFAULT_METHOD,
    *,
    target_fpr: float | None = None,
    labels: npt.ArrayLike | None = None,
    value: float | None = None,
) -> Threshold:
    """A :class:`Threshold` by ``method`` (see the module docstring for assumptions)."""
    array = _check_scores(scores)
    if method in RATE_METHODS:
        if target_fpr is None:
            raise ValueError(f"method {method!r} needs target_fpr")
        if method == "robust":
            threshold, fitted = _robust_calibration(array, target_fpr)
        else:
            func = quantile_threshold if method == "quantile" else pot_threshold
            threshold, fitted = func(array, target_fpr), {}
        params = {"target_fpr": target_fpr, **fitted}
    elif method == "labels":
        if labels is None:
            raise ValueError("method 'labels' needs labels")
        threshold, params = labels_threshold(array, labels), {}
    elif method == "fixed":
        if value is None or not math.isfinite(value):
            raise ValueError("method 'fixed' needs a finite value")
        threshold, params = float(value), {"value": float(value)}
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return Threshold(threshold, method, params, float((array > threshold).mean()))


@dataclass(frozen=True)
class SeverityScale:
    """Severity 0-100 of a score from its tail probability under calibration scores.

    The body of the distribution is an empirical quantile grid; above the POT
    initial quantile the GPD tail (when it could be fitted) extrapolates. Past
    the largest calibration score the tail probability falls from its value
    there as the ``robust`` fit's survival does, so scores beyond every
    calibration score keep rising to 100 whatever the number of calibration rows.
    A scale without a ``robust`` fit (stored before it existed, or scores
    without a usable bulk) stays at its value at the largest score, or the GPD's.
    """

    levels: tuple[float, ...]
    quantiles: tuple[float, ...]
    n_scores: int
    tail: ParetoTail | None
    robust: RobustFit | None = None

    @classmethod
    def fit(cls, scores: Scores) -> SeverityScale:
        """Build the scale from calibration scores."""
        array = _check_scores(scores)
        levels = np.linspace(0.0, 1.0, min(SEVERITY_GRID_POINTS, max(2, array.size)))
        quantiles = np.quantile(array, levels)
        # Subnormal scores are zero here: interpolating between them overflows.
        quantiles[np.abs(quantiles) < np.finfo(np.float64).tiny] = 0.0
        quantiles = np.maximum.accumulate(quantiles)
        return cls(tuple(levels.tolist()), tuple(quantiles.tolist()), int(array.size),
                   fit_pareto_tail(array), fit_robust(array))

    def _within(self, s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Empirical tail probability floored at 1/(n+1), below the GPD where fitted."""
        body = 1.0 - np.interp(s, self.quantiles, self.levels, left=0.0, right=1.0)
        p = np.maximum(body, 1.0 / (self.n_scores + 1))
        if self.tail is not None:
            beyond = s > self.tail.threshold
            p = np.where(beyond, np.minimum(p, self.tail.survival(s)), p)
        return np.clip(p, 0.0, 1.0)

    def tail_probability(self, scores: Scores) -> npt.NDArray[np.float64]:
        """P(S >= score) under the calibration distribution, extrapolated past its maximum."""
        s = np.asarray(scores, dtype=np.float64)
        p = self._within(s)
        top = self.quantiles[-1]
        beyond = s > top
        if self.robust is None or not beyond.any():
            return p
        anchor = float(self._within(np.array([top]))[0])
        drop = np.minimum(self.robust.log_survival(s) - self.robust.log_survival([top])[0], 0.0)
        return np.where(beyond, np.minimum(p, anchor * np.exp(drop)), p)

    def severity(self, scores: Scores) -> npt.NDArray[np.float64]:
        """Severity in [0, 100]: ``100 * min(1, -log10(p) / SEVERITY_DECADES)``."""
        p = self.tail_probability(scores)
        with np.errstate(divide="ignore"):
            decades = -np.log10(p)
        return np.clip(100.0 * decades / SEVERITY_DECADES, 0.0, 100.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {
            "levels": list(self.levels),
            "quantiles": list(self.quantiles),
            "n_scores": self.n_scores,
            "tail": None if self.tail is None else asdict(self.tail),
            "robust": None if self.robust is None else asdict(self.robust),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SeverityScale:
        """Rebuild from :meth:`to_dict`.

        A scale stored before the robust fit existed (no ``robust`` key) gets it
        fitted now from its stored quantile grid (an equal-probability sample of
        its calibration scores; the scores themselves up to 1,001 of them), so
        the severities of every stored version keep rising past the largest
        held-out score.
        """
        tail = state.get("tail")
        quantiles = tuple(float(v) for v in state["quantiles"])
        if "robust" in state:
            robust = state["robust"]
            fit = None if robust is None else RobustFit(**{k: float(v)
                                                           for k, v in robust.items()})
        else:
            fit = fit_robust(np.asarray(quantiles))
        return cls(
            tuple(float(v) for v in state["levels"]), quantiles, int(state["n_scores"]),
            None if tail is None else ParetoTail(**{k: float(v) for k, v in tail.items()}),
            fit,
        )
