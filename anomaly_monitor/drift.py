"""Drift: how far the rows a version scores have moved from the rows it was trained on.

At training, each feature's distribution is summarised by the edges of its deciles
and the share of training rows between them (:func:`reference_of`, stored in the
version's ``validation["reference"]``), and the held-out scores likewise. Each batch
adds its rows' bin counts to decayed totals (about the last day of rows weigh, at
least ``DRIFT_WINDOW_ROWS``), kept in ``am_drift`` and written by the batch's own
transaction. Drift
is the population stability index (PSI) of those totals against the reference:
per feature, of the scores, and the share of rows above the threshold against the
share the calibration expected.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.tables import as_utc
from anomaly_monitor.tables import drift as drift_table

#: Bins of a reference distribution (deciles; fewer where values tie).
REFERENCE_BINS = 10
#: A feature (or the scores) drifted when its PSI reaches this: the usual reading of
#: the index is below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a significant one.
DRIFT_LEVEL = 0.25
#: Rows weigh by ``exp(-rows after them / window)``, the window being about a day of
#: the training window's rows, at least this many ...
DRIFT_WINDOW_ROWS = 2000
#: ... and at most this many.
DRIFT_MAX_WINDOW_ROWS = 100_000
#: Drift is reported as 0 until a version has scored this many rows (a PSI of a few rows
#: is noise: about (bins - 1) / rows even without drift).
DRIFT_MIN_ROWS = 500
#: Empty bins count as this share (the PSI of a bin is then finite).
PSI_FLOOR = 1e-4


def _bins(values: npt.NDArray[np.float64]) -> dict[str, list[float]]:
    """The decile edges of ``values`` (distinct) and the share of values in each bin
    (``x <= edges[0]``, ``edges[i-1] < x <= edges[i]``, ``x > edges[-1]``)."""
    finite = _rounded(values)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return {"edges": [], "shares": [1.0]}
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, REFERENCE_BINS + 1)[1:-1]))
    counts = bin_counts(finite, edges)
    return {"edges": [float(e) for e in edges],
            "shares": [float(c) for c in counts / counts.sum()]}


def _rounded(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``values`` at float32 precision: training keeps its matrix in float32 and a batch
    reads float64, so that a value at an edge (0.7) falls in the same bin in both."""
    with np.errstate(over="ignore"):  # beyond float32's range: infinite, not counted
        return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def drift_window_rows(rows_per_day: float | None) -> int:
    """The rows drift is measured over: about a day of them (so that a daily cycle is
    not drift), at least ``DRIFT_WINDOW_ROWS``, at most ``DRIFT_MAX_WINDOW_ROWS``."""
    if rows_per_day is None:
        return DRIFT_WINDOW_ROWS
    return int(min(DRIFT_MAX_WINDOW_ROWS, max(DRIFT_WINDOW_ROWS, rows_per_day)))


def reference_of(values: npt.NDArray[np.float64], names: Sequence[str],
                 scores: npt.NDArray[np.float64], *, window_rows: int = DRIFT_WINDOW_ROWS,
                 ) -> dict[str, Any]:
    """The training reference of a version: each feature's bins over the training rows
    ``values`` (columns ``names``), the held-out ``scores``' bins, and the rows drift
    is measured over (``window_rows``)."""
    return {"bins": REFERENCE_BINS, "window_rows": window_rows,
            "features": {name: _bins(np.asarray(values[:, j], dtype=np.float64))
                         for j, name in enumerate(names)},
            "scores": _bins(np.asarray(scores, dtype=np.float64))}


def bin_counts(values: npt.ArrayLike, edges: Sequence[float]) -> npt.NDArray[np.float64]:
    """How many of ``values`` (at float32 precision) fall in each bin of ``edges``."""
    x = _rounded(values)
    return np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), x[np.isfinite(x)],
                                       side="left"), minlength=len(edges) + 1).astype(float)


def psi(shares: Sequence[float], counts: npt.ArrayLike) -> float:
    """The population stability index of ``counts`` against the reference ``shares``:
    ``sum((p - q) * ln(p / q))``, empty bins floored at ``PSI_FLOOR``."""
    observed = np.asarray(counts, dtype=np.float64)
    total = observed.sum()
    if total <= 0:
        return 0.0
    p = np.maximum(observed / total, PSI_FLOOR)
    q = np.maximum(np.asarray(shares, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


@dataclass
class DriftReport:
    """Drift of a version's recent rows from its training reference."""

    version: int
    rows: int
    #: PSI per feature, and which features reach ``DRIFT_LEVEL``.
    features: dict[str, float] = field(default_factory=dict)
    score_drift: float = 0.0
    #: The share of recent rows above the threshold, and what calibration expected.
    flag_share: float | None = None
    expected_share: float | None = None
    #: Whether enough rows were scored (``DRIFT_MIN_ROWS``) for the figures to mean much.
    measured: bool = False

    @property
    def drift_score(self) -> float:
        """The largest feature drift (0 before ``DRIFT_MIN_ROWS``)."""
        return max(self.features.values(), default=0.0) if self.measured else 0.0

    @property
    def drifted(self) -> list[str]:
        """The features whose PSI reaches ``DRIFT_LEVEL``, most drifted first."""
        if not self.measured:
            return []
        return sorted((f for f, v in self.features.items() if v >= DRIFT_LEVEL),
                      key=lambda f: -self.features[f])

    @property
    def drifting(self) -> bool:
        """Whether a feature or the scores passed ``DRIFT_LEVEL`` (a drift retrain)."""
        return self.measured and (self.drift_score >= DRIFT_LEVEL
                                  or self.score_drift >= DRIFT_LEVEL)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftReport:
        """Rebuild from :meth:`to_dict` (a report stored in ``am_drift``)."""
        return cls(int(data["version"]), int(data["rows"]), dict(data.get("features") or {}),
                   float(data.get("score_drift") or 0.0), data.get("flag_share"),
                   data.get("expected_share"), measured=bool(data.get("measured")))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (``drift MONITOR --json``)."""
        return {"version": self.version, "rows": self.rows, "measured": self.measured,
                "level": DRIFT_LEVEL, "drift_score": self.drift_score,
                "drifted_features": self.drifted,
                "score_drift": self.score_drift if self.measured else 0.0,
                "flag_share": self.flag_share, "expected_share": self.expected_share,
                "features": dict(sorted(self.features.items(), key=lambda kv: -kv[1]))}


@dataclass
class DriftState:
    """Decayed bin counts of the rows a version scored (a row of ``am_drift``)."""

    version: int
    rows: int = 0
    features: dict[str, list[float]] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    #: Decayed counts of all rows and of the rows above the threshold.
    weight: float = 0.0
    above: float = 0.0

    def add(self, reference: dict[str, Any], values: npt.NDArray[np.float64],
            names: Sequence[str], scores: npt.NDArray[np.float64], above: int) -> None:
        """Add a batch: its rows' values (columns ``names``), scores and how many of
        them passed the threshold; older rows decay by the batch's size."""
        n = len(scores)
        if n == 0:
            return
        decay = math.exp(-n / reference.get("window_rows", DRIFT_WINDOW_ROWS))
        for j, name in enumerate(names):
            bins = reference["features"].get(name)
            if bins is None:
                continue
            new = bin_counts(values[:, j], bins["edges"])
            old = np.asarray(self.features.get(name) or np.zeros_like(new))
            self.features[name] = [float(v) for v in old * decay + new]
        new_scores = bin_counts(scores, reference["scores"]["edges"])
        old_scores = np.asarray(self.scores or np.zeros_like(new_scores))
        self.scores = [float(v) for v in old_scores * decay + new_scores]
        self.weight = self.weight * decay + n
        self.above = self.above * decay + above
        self.rows += n

    def report(self, reference: dict[str, Any], expected_share: float | None) -> DriftReport:
        """The drift these counts show against ``reference``."""
        features = {name: psi(reference["features"][name]["shares"], counts)
                    for name, counts in self.features.items()
                    if name in reference["features"]}
        return DriftReport(
            self.version, self.rows, features,
            psi(reference["scores"]["shares"], self.scores) if self.scores else 0.0,
            self.above / self.weight if self.weight else None, expected_share,
            measured=self.rows >= DRIFT_MIN_ROWS)

    def to_json(self) -> dict[str, Any]:
        """The counts as stored in ``am_drift.state``."""
        return {"features": self.features, "scores": self.scores, "weight": self.weight,
                "above": self.above}


def read_drift(connection: sa.Connection, monitor: str, version: int) -> DriftState:
    """The monitor's drift counts for ``version`` (empty when another version wrote the
    row: a new version starts afresh)."""
    row = connection.execute(sa.select(drift_table).where(drift_table.c.monitor == monitor)
                             ).first()
    if row is None or row.version != version:
        return DriftState(version)
    state = row.state or {}
    return DriftState(version, int(row.rows), dict(state.get("features") or {}),
                      list(state.get("scores") or []), float(state.get("weight") or 0.0),
                      float(state.get("above") or 0.0))


def stored_report(connection: sa.Connection, monitor: str
                  ) -> tuple[dict[str, Any], dt.datetime] | None:
    """The last drift report a batch wrote, and when; ``None`` before any."""
    row = connection.execute(sa.select(drift_table.c.report, drift_table.c.updated_at)
                             .where(drift_table.c.monitor == monitor)).first()
    return None if row is None else (dict(row.report), as_utc(row.updated_at))


def drift_writer(monitor: str, state: DriftState, report: DriftReport, now: dt.datetime
                 ) -> Callable[[sa.Connection], None]:
    """The batch transaction's write of the monitor's drift counts and report."""
    values = {"version": state.version, "rows": state.rows, "state": state.to_json(),
              "drift_score": report.drift_score, "drifted_features": len(report.drifted),
              "score_drift": report.score_drift if report.measured else 0.0,
              "report": report.to_dict(), "updated_at": now}

    def write(connection: sa.Connection) -> None:
        updated = connection.execute(drift_table.update()
                                     .where(drift_table.c.monitor == monitor).values(**values))
        if updated.rowcount == 0:
            connection.execute(drift_table.insert().values(monitor=monitor, **values))

    return write
