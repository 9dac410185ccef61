"""``backtest``: replay stored history through the scoring path, writing nothing.

The rows stamped in ``[since, until)`` are read in id order and scored by a stored
version (the active one, or a candidate to compare before activating it) with the
functions ``run`` uses (:func:`anomaly_monitor.scoring.score_rows` and ``flag_rows``);
flags are marked by the suppression windows and grouped into incidents the way a batch
does (:func:`anomaly_monitor.incidents.group`), in memory. ``am_anomalies``, the
incidents, the entities' states and the cursor are not touched.

A window monitor's rows score in order with their entities' states: the replay starts
from the states the version was trained to (``am_trained_states``) at the first row
after its training window and scores every row up to ``until``, reporting those from
``since`` on; a row monitor's rows are read from ``since`` directly. So the flags equal
what ``run`` flags with that version from its training onwards (incidents may differ
at the edges of the range, where ``run`` joined flags before ``since``).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.entities import read_trained_states, row_entities
from anomaly_monitor.feedback import labelled_flags
from anomaly_monitor.incidents import group, incident_gap
from anomaly_monitor.reading.values import Window
from anomaly_monitor.registry import LoadedModel, RegistryError, active_version, load_model
from anomaly_monitor.scoring import StreamContext, check_features, flag_rows, score_rows
from anomaly_monitor.source import (
    SourceTable,
    count_training,
    newest_id,
    read_training,
    reflect_source,
)
from anomaly_monitor.suppression import suppress_flags

#: Severity bands of the report (upper bounds, 0-100).
SEVERITY_BANDS = (25.0, 50.0, 75.0, 90.0, 99.0, 100.0)
#: Rows read and scored per page.
PAGE_ROWS = 50_000


@dataclass
class ThresholdRun:
    """What one threshold flags over the range."""

    threshold: float
    label: str
    flags: list[dict[str, Any]] = field(default_factory=list)
    incidents: int = 0
    #: Incidents that would raise an alert (severity at least the monitor's
    #: ``alert_severity``), and every incident's first and last flag time and severity.
    alerts: int = 0
    spans: list[tuple[dt.datetime | None, dt.datetime | None, float]] = field(
        default_factory=list)
    #: Per UTC day (ISO date): rows, flags, suppressed flags, incidents opened.
    per_day: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    precision: float | None = None
    recall: float | None = None

    @property
    def suppressed(self) -> int:
        return sum(1 for f in self.flags if f["suppressed_by"])

    def severity_bands(self) -> dict[str, int]:
        """Unsuppressed flags per severity band (``"50-75"``: above 50, at most 75)."""
        names = _band_names()
        counts = dict.fromkeys(names, 0)
        for f in self.flags:
            if not f["suppressed_by"]:
                band = int(np.searchsorted(SEVERITY_BANDS, f["severity"]))
                counts[names[min(band, len(SEVERITY_BANDS) - 1)]] += 1
        return counts


def _band_names() -> list[str]:
    lows = (0.0, *SEVERITY_BANDS[:-1])
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(lows, SEVERITY_BANDS, strict=True)]


@dataclass
class Backtest:
    """The replay of ``[since, until)`` by one version, per threshold."""

    monitor: str
    version: int
    status: str
    since: dt.datetime
    until: dt.datetime
    runs: list[ThresholdRun]
    rows: int = 0
    quarantined: int = 0
    #: The share of held-out rows the version's threshold flags (what it was calibrated to).
    calibrated_rate: float | None = None
    labels_from: str | None = None
    alert_severity: float = 0.0
    #: Each scored row's time (epoch seconds; NaN when unreadable) and score, for the plot.
    times: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    scores: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))


def _load(connection: sa.Connection, monitor: MonitorSettings,
          version: int | None) -> LoadedModel:
    number = active_version(connection, monitor.name) if version is None else version
    if number is None:
        raise RegistryError(f"monitor {monitor.name!r} has no active model; run: "
                            f"anomaly-monitor train {monitor.name} (or pass --version)")
    model = load_model(connection, monitor.name, number, device="cpu")
    check_features(monitor, model.version)
    return model


def _bounds(connection: sa.Connection, source: SourceTable, model: LoadedModel,
            since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    """Which rows to score, in id order: a row monitor's from ``since``, a window
    monitor's from the first after its training window (their states move through
    them)."""
    if model.window is None:
        return {"since": since, "until": until}
    return {"until": until, "id_range": (int(model.version.training["last_id"]) + 1,
                                         newest_id(connection, source))}


def rows_to_read(engine: sa.Engine, monitor: MonitorSettings, *, since: dt.datetime,
                 until: dt.datetime, version: int | None = None) -> int:
    """How many rows :func:`run_backtest` reads (the length of its progress bar)."""
    with engine.connect() as connection:
        model = _load(connection, monitor, version)
        source = reflect_source(connection, monitor)
        return count_training(connection, source,
                              **_bounds(connection, source, model, since, until))


def _stream(connection: sa.Connection, source: SourceTable, model: LoadedModel,
            states: dict[str, Any] | None, page: Window) -> StreamContext | None:
    if model.window is None:
        return None
    if states is None:
        raise RegistryError(
            f"version {model.version.version} of monitor {model.version.monitor!r} was "
            "trained before its trained states were kept; backtest needs them: retrain "
            f"(anomaly-monitor train {model.version.monitor})")
    return StreamContext(row_entities(connection, source, page.ids)[0], states)


def run_backtest(
    engine: sa.Engine, monitor: MonitorSettings, *, since: dt.datetime, until: dt.datetime,
    version: int | None = None, thresholds: Sequence[float] = (),
    progress: Callable[[int], None] | None = None,
) -> Backtest:
    """Replay ``monitor``'s rows stamped in ``[since, until)`` through ``version``
    (default: the active one) at each of ``thresholds`` (default: the version's),
    without writing anything; ``progress(rows)`` is called after each page."""
    if until <= since:
        raise ValueError(f"--until ({until.isoformat()}) must be after --since "
                         f"({since.isoformat()})")
    now = dt.datetime.now(dt.UTC)
    with engine.connect() as connection:
        model = _load(connection, monitor, version)
        source = reflect_source(connection, monitor)
        states = (read_trained_states(connection, monitor.name, model.version.version,
                                      model.window) if model.window is not None else None)
        number = model.version.version
        runs = [ThresholdRun(t, "version's" if t == model.version.threshold else "given")
                for t in (thresholds or [model.version.threshold])]
        report = Backtest(monitor.name, number, model.version.status, since, until, runs,
                          calibrated_rate=model.version.validation.get("holdout_flag_rate"),
                          alert_severity=monitor.incidents.alert_severity)
        times, scores, truth, ids = [], [], [], []
        bounds = _bounds(connection, source, model, since, until)
        for page in read_training(connection, source, **bounds,
                                  with_label=source.label_column is not None,
                                  page_rows=PAGE_ROWS):
            stream = _stream(connection, source, model, states, page)
            scored = score_rows(model, page, stream) if len(page.ids) else None
            if stream is not None:
                states = stream.states
            stamps = np.array([_epoch(page.timestamp(i)) for i in range(len(page.ids))])
            keep = ~(stamps < since.timestamp())  # NaN (unreadable) rows count as in range
            report.quarantined += len(page.bad)
            if scored is None or not keep.any():
                if progress:
                    progress(page.size)
                continue
            report.rows += int(keep.sum())
            times.append(stamps[keep])
            scores.append(scored.scores[keep])
            ids.append(page.ids[keep])
            if page.labels is not None:
                truth.append(page.labels[keep])
            for run in runs:
                flags, _ = flag_rows(monitor.name, model, page, now, stream, scored,
                                     run.threshold)
                kept = set(page.ids[keep].tolist())
                flags = [f for f in flags if f["source_id"] in kept]
                suppress_flags(connection, monitor.name, monitor.suppress, flags)
                run.flags += flags
            if progress:
                progress(page.size)
        report.times = np.concatenate(times) if times else np.zeros(0)
        report.scores = np.concatenate(scores) if scores else np.zeros(0)
        all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        _tally(report, monitor, model, now)
        _label_metrics(connection, report, monitor, all_ids,
                       np.concatenate(truth) if truth else None)
    return report


def _epoch(value: dt.datetime | None) -> float:
    return value.timestamp() if value is not None else float("nan")


def _day(value: dt.datetime | None) -> str:
    return value.date().isoformat() if value is not None else "unknown"


def _tally(report: Backtest, monitor: MonitorSettings, model: LoadedModel,
           now: dt.datetime) -> None:
    """Rows, flags and incidents per day, and the incidents of each threshold."""
    rows_per_day = Counter(
        dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat() if np.isfinite(t)
        else "unknown" for t in report.times)
    gap = incident_gap(monitor, model.version)
    for run in report.runs:
        for day, n in rows_per_day.items():
            run.per_day[day]["rows"] = n
        for f in run.flags:
            run.per_day[_day(f["source_timestamp"])]["suppressed" if f["suppressed_by"]
                                                     else "flags"] += 1
        loud = [f for f in run.flags if not f["suppressed_by"]]
        grouped = group(loud, [], monitor=monitor.name, generation=0, gap_seconds=gap, now=now)
        run.incidents = len(grouped.touched)
        run.spans = sorted(((i.first, i.last, float(i.row["max_severity"]))
                            for i in grouped.touched),
                           key=lambda s: s[0] or dt.datetime.min.replace(tzinfo=dt.UTC))
        run.alerts = sum(1 for *_, severity in run.spans
                         if severity >= monitor.incidents.alert_severity)
        for incident in grouped.touched:
            run.per_day[_day(incident.first)]["incidents"] += 1
            if incident.row["max_severity"] >= monitor.incidents.alert_severity:
                run.per_day[_day(incident.first)]["alerts"] += 1


def _label_metrics(connection: sa.Connection, report: Backtest, monitor: MonitorSettings,
                   ids: npt.NDArray[np.int64], truth: npt.NDArray[np.float64] | None) -> None:
    """Precision and recall of each threshold from the label column, else feedback."""
    if truth is not None:
        known = ~np.isnan(truth)
        positives = {int(i) for i, t in zip(ids[known], truth[known] > 0.5, strict=True) if t}
        labelled = {int(i) for i in ids[known]}
        report.labels_from = "label column"
    else:
        given = labelled_flags(connection, monitor.name)
        inside = np.isin(given.source_ids, ids)
        if not inside.any():
            return
        positives = {int(i) for i in given.source_ids[inside & given.positive]}
        labelled = {int(i) for i in given.source_ids[inside]}
        report.labels_from = "feedback"
    for run in report.runs:
        flagged = {f["source_id"] for f in run.flags if f["source_id"] in labelled}
        hits = len(flagged & positives)
        run.precision = hits / len(flagged) if flagged else None
        run.recall = hits / len(positives) if positives else None


def flag_rate(report: Backtest, run: ThresholdRun) -> float:
    """The share of the range's scored rows the threshold flags (suppressed ones too)."""
    return len(run.flags) / report.rows if report.rows else 0.0

