"""Scoring a window with a model: flagged rows, severities, top features. No SQL.

Also the id arithmetic of gaps (ids a window skipped that may still commit).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import numpy.typing as npt

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.reading.values import Window
from anomaly_monitor.registry import LoadedModel, ModelVersion
from anomaly_monitor.source import SchemaError

#: Feature contributions stored with each flagged row.
TOP_FEATURES = 3


def check_features(monitor: MonitorSettings, version: ModelVersion) -> None:
    """Refuse a model trained on other features than the monitor's configured list."""
    if monitor.features is not None and list(monitor.features) != list(version.features):
        raise SchemaError(
            f"monitor {monitor.name!r}: active model version {version.version} was "
            f"trained on features {version.features}, but the config lists "
            f"{list(monitor.features)}; retrain with: anomaly-monitor train {monitor.name}"
        )


def _contributions(
    model: LoadedModel, values: npt.NDArray[np.float64], scores: npt.NDArray[np.float64]
) -> list[list[dict[str, Any]]]:
    """The top features of each row: name, share of the score, raw value."""
    if len(values) == 0:
        return []
    shares = model.detector.feature_errors(values)
    names = model.version.features
    top = np.argsort(-shares, axis=1, kind="stable")[:, :TOP_FEATURES]
    return [
        [{"feature": names[j], "share": round(float(shares[i, j] / scores[i]), 4)
          if scores[i] > 0 else 0.0, "value": float(values[i, j])} for j in top[i]]
        for i in range(len(values))
    ]


def score_window(
    monitor: str, model: LoadedModel, window: Window, scored_at: dt.datetime
) -> tuple[list[dict[str, Any]], npt.NDArray[np.float64]]:
    """The rows of ``window`` the model flags, as ``am_anomalies`` rows, and their
    severities (quarantined rows are not in ``window.values``)."""
    if len(window.ids) == 0:
        return [], np.zeros(0)
    scores = model.detector.decision_function(window.values)
    threshold = model.version.threshold
    flagged = np.flatnonzero(scores > threshold)
    severities = model.severity.severity(scores[flagged])
    tops = _contributions(model, window.values[flagged], scores[flagged])
    rows = [
        {"monitor": monitor, "source_id": int(window.ids[i]),
         "source_timestamp": window.timestamp(i), "score": float(scores[i]),
         "threshold": threshold, "severity": float(severities[k]),
         "model_version": model.version.version, "contributions": tops[k],
         "scored_at": scored_at}
        for k, i in enumerate(flagged)
    ]
    return rows, severities


def gap_ranges(ids: npt.ArrayLike, after: int, last: int) -> list[list[int]]:
    """Inclusive id ranges in ``after+1 .. last`` that are not in ``ids``."""
    seen = np.asarray(ids, dtype=np.int64)
    if len(seen) == last - after and len(seen) and seen[0] == after + 1 and \
            seen[-1] == last and bool((np.diff(seen) == 1).all()):
        return []  # the common case, a contiguous window: no sort needed
    seen = np.unique(seen)
    edges = np.concatenate([[after], seen[(seen > after) & (seen <= last)], [last + 1]])
    holes = np.flatnonzero(np.diff(edges) > 1)
    return [[int(edges[i] + 1), int(edges[i + 1] - 1)] for i in holes]


def subtract_ids(ranges: list[list[int]], found: npt.ArrayLike) -> list[list[int]]:
    """``ranges`` without the ids in ``found``."""
    found_ids = np.unique(np.asarray(found, dtype=np.int64))
    left: list[list[int]] = []
    for a, b in ranges:
        inside = found_ids[(found_ids >= a) & (found_ids <= b)]
        left += gap_ranges(inside, a - 1, b) if inside.size else [[a, b]]
    return left
