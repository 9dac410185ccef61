"""Thresholds and severities from anomaly scores: pure functions, no I/O.

Scores follow the detectors' convention (higher = more anomalous) and a row is
flagged when ``score > threshold``. Calibration scores are the scores of
recent rows held out from training, assumed to be (mostly) normal.

Methods and their assumptions:

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
million (or rarer) 100. The tail beyond the calibration data is extrapolated
with the same GPD fit as ``pot``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

METHODS: tuple[str, ...] = ("quantile", "pot", "labels", "fixed")
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
    method: str = "quantile",
    *,
    target_fpr: float | None = None,
    labels: npt.ArrayLike | None = None,
    value: float | None = None,
) -> Threshold:
    """A :class:`Threshold` by ``method`` (see the module docstring for assumptions)."""
    array = _check_scores(scores)
    if method in ("quantile", "pot"):
        if target_fpr is None:
            raise ValueError(f"method {method!r} needs target_fpr")
        func = quantile_threshold if method == "quantile" else pot_threshold
        threshold, params = func(array, target_fpr), {"target_fpr": target_fpr}
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
    initial quantile the GPD tail (when it could be fitted) extrapolates, so
    scores beyond every calibration score still get distinct, finite severities.
    """

    levels: tuple[float, ...]
    quantiles: tuple[float, ...]
    n_scores: int
    tail: ParetoTail | None

    @classmethod
    def fit(cls, scores: Scores) -> SeverityScale:
        """Build the scale from calibration scores."""
        array = _check_scores(scores)
        levels = np.linspace(0.0, 1.0, min(SEVERITY_GRID_POINTS, max(2, array.size)))
        quantiles = np.quantile(array, levels)
        return cls(tuple(levels.tolist()), tuple(quantiles.tolist()), int(array.size),
                   fit_pareto_tail(array))

    def tail_probability(self, scores: Scores) -> npt.NDArray[np.float64]:
        """P(S >= score) under the calibration distribution, floored at 1/(n+1) in the body."""
        s = np.asarray(scores, dtype=np.float64)
        body = 1.0 - np.interp(s, self.quantiles, self.levels, left=0.0, right=1.0)
        p = np.maximum(body, 1.0 / (self.n_scores + 1))
        if self.tail is not None:
            beyond = s > self.tail.threshold
            p = np.where(beyond, np.minimum(p, self.tail.survival(s)), p)
        return np.clip(p, 0.0, 1.0)

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
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SeverityScale:
        """Rebuild from :meth:`to_dict`."""
        tail = state.get("tail")
        return cls(
            tuple(float(v) for v in state["levels"]),
            tuple(float(v) for v in state["quantiles"]),
            int(state["n_scores"]),
            None if tail is None else ParetoTail(**{k: float(v) for k, v in tail.items()}),
        )
