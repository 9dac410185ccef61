"""``run_batch``: read the rows after a monitor's cursor, score them, commit the result.

A batch reads its window outside any write transaction, scores it, then in ONE
transaction advances the cursor with a compare-and-set on its old position and
inserts the flagged rows, the quarantined rows and the batch record. If another
writer moved the cursor meanwhile, the compare-and-set matches nothing and the
whole batch rolls back (:class:`BatchConflictError`); the unique (monitor, source_id)
keys are the second guard. A crash anywhere leaves all of the batch or none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.registry import LoadedModel, load_model
from anomaly_monitor.source import SchemaError, SourceTable, Window, read_window
from anomaly_monitor.tables import (
    anomalies,
    as_utc,
    batches,
    cursors,
    model_versions,
    quarantine,
    utcnow,
)

#: Feature contributions stored with each flagged row.
TOP_FEATURES = 3


class BatchConflictError(RuntimeError):
    """The cursor moved while the batch was scored; the batch was rolled back."""


@dataclass(frozen=True)
class CursorState:
    """A monitor's row in ``am_cursors``."""

    position: int
    paused: bool
    pause_reason: str | None
    updated_at: dt.datetime | None


@dataclass(frozen=True)
class BatchResult:
    """What one call of :func:`run_batch` did.

    ``status`` is ``committed`` (a batch was written), ``idle`` (nothing to
    read), ``paused`` or ``no_model`` (nothing was read).
    """

    monitor: str
    status: str
    scored: int = 0
    flagged: int = 0
    quarantined: int = 0
    first_id: int | None = None
    last_id: int | None = None
    model_version: int | None = None
    duration_seconds: float = 0.0
    newest_timestamp: dt.datetime | None = None
    caught_up: bool = True
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    severities: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    @property
    def rows(self) -> int:
        """Rows consumed: scored plus quarantined."""
        return self.scored + self.quarantined


def read_cursor(connection: sa.Connection, monitor: str) -> CursorState | None:
    """The monitor's cursor, ``None`` before its first model is activated."""
    row = connection.execute(
        sa.select(cursors.c.position, cursors.c.paused, cursors.c.pause_reason,
                  cursors.c.updated_at).where(cursors.c.monitor == monitor)
    ).first()
    if row is None:
        return None
    return CursorState(int(row.position), bool(row.paused), row.pause_reason,
                       as_utc(row.updated_at))


def set_paused(connection: sa.Connection, monitor: str, reason: str | None) -> None:
    """Pause the monitor with ``reason``, or resume it when ``reason`` is ``None``."""
    connection.execute(
        cursors.update().where(cursors.c.monitor == monitor)
        .values(paused=reason is not None, pause_reason=reason, updated_at=utcnow())
    )


class ModelCache:
    """The loaded active model of each monitor, reloaded when the active version or
    its threshold changes (so activation and calibration need no restart)."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._models: dict[str, LoadedModel] = {}

    def active(self, connection: sa.Connection, monitor: str) -> LoadedModel | None:
        """The active model of ``monitor``, or ``None`` when no version is active."""
        row = connection.execute(
            sa.select(model_versions.c.version, model_versions.c.threshold,
                      model_versions.c.threshold_method)
            .where(model_versions.c.monitor == monitor, model_versions.c.status == "active")
        ).first()
        if row is None:
            self._models.pop(monitor, None)
            return None
        cached = self._models.get(monitor)
        if cached is None or cached.version.version != row.version:
            cached = load_model(connection, monitor, row.version, device=self.device)
        elif cached.version.threshold != row.threshold:
            meta = dataclasses.replace(cached.version, threshold=float(row.threshold),
                                       threshold_method=row.threshold_method)
            cached = LoadedModel(meta, cached.detector, cached.severity)
        self._models[monitor] = cached
        return cached


def check_features(monitor: MonitorSettings, model: LoadedModel) -> None:
    """Refuse a model trained on other features than the monitor's configured list."""
    if monitor.features is not None and list(monitor.features) != list(model.version.features):
        raise SchemaError(
            f"monitor {monitor.name!r}: active model version {model.version.version} was "
            f"trained on features {model.version.features}, but the config lists "
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


def _score(
    monitor: str, model: LoadedModel, window: Window, scored_at: dt.datetime
) -> tuple[list[dict[str, Any]], npt.NDArray[np.float64]]:
    """Rows for ``am_anomalies`` and their severities."""
    if len(window.ids) == 0:
        return [], np.zeros(0)
    scores = model.detector.decision_function(window.values)
    threshold = model.version.threshold
    flagged = np.flatnonzero(scores > threshold)
    severities = model.severity.severity(scores[flagged])
    tops = _contributions(model, window.values[flagged], scores[flagged])
    rows = [
        {"monitor": monitor, "source_id": int(window.ids[i]),
         "source_timestamp": window.timestamps[i], "score": float(scores[i]),
         "threshold": threshold, "severity": float(severities[k]),
         "model_version": model.version.version, "contributions": tops[k],
         "scored_at": scored_at}
        for k, i in enumerate(flagged)
    ]
    return rows, severities


def _commit(
    engine: sa.Engine, monitor: str, cursor: CursorState, window: Window,
    flagged: list[dict[str, Any]], batch: dict[str, Any], now: dt.datetime,
) -> None:
    with engine.begin() as connection:
        moved = connection.execute(
            cursors.update()
            .where(cursors.c.monitor == monitor, cursors.c.position == cursor.position,
                   cursors.c.paused == sa.false())
            .values(position=window.last_id, updated_at=now)
        )
        if moved.rowcount != 1:
            raise BatchConflictError(
                f"monitor {monitor!r}: the cursor moved from {cursor.position} or the monitor "
                "was paused during the batch; rolled back"
            )
        if flagged:
            connection.execute(anomalies.insert(), flagged)
        if window.bad:
            connection.execute(quarantine.insert(), [
                {"monitor": monitor, "source_id": b.source_id, "reason": b.reason,
                 "detail": b.detail, "raw_values": b.raw_values, "quarantined_at": now}
                for b in window.bad
            ])
        connection.execute(batches.insert().values(**batch))


def run_batch(
    engine: sa.Engine,
    monitor: MonitorSettings,
    source: SourceTable,
    models: ModelCache,
    *,
    clock: Callable[[], dt.datetime] = utcnow,
) -> BatchResult:
    """Score the next window after the monitor's cursor and commit it atomically.

    Reads at most ``monitor.batch_size`` rows in id order, stopping before rows
    younger than ``query_delay_seconds``. Rows with NULL, NaN, infinite or
    non-numeric values are quarantined with a reason; the others are scored and
    those above the threshold inserted into ``am_anomalies``. Raises
    :class:`BatchConflictError` when another writer moved the cursor meanwhile.
    """
    started = clock()
    t0 = time.perf_counter()
    with engine.connect() as connection:
        cursor = read_cursor(connection, monitor.name)
        if cursor is None:
            return BatchResult(monitor.name, "no_model")
        if cursor.paused:
            return BatchResult(monitor.name, "paused")
        model = models.active(connection, monitor.name)
        if model is None:
            return BatchResult(monitor.name, "no_model")
        check_features(monitor, model)
        ready_before = (started - dt.timedelta(seconds=monitor.query_delay_seconds)
                        if monitor.query_delay_seconds > 0 else None)
        window = read_window(connection, source, cursor.position, monitor.batch_size,
                             features=model.version.features, ready_before=ready_before)
    if window.last_id is None:
        return BatchResult(monitor.name, "idle", model_version=model.version.version)
    flagged, severities = _score(monitor.name, model, window, started)
    stamps = [t for t in window.timestamps if t is not None]
    newest = max(stamps) if stamps else None
    ids = list(window.ids) + [b.source_id for b in window.bad]
    result = BatchResult(
        monitor.name, "committed", scored=len(window.ids), flagged=len(flagged),
        quarantined=len(window.bad), first_id=int(min(ids)), last_id=window.last_id,
        model_version=model.version.version, newest_timestamp=newest,
        caught_up=window.size < monitor.batch_size,
        quarantine_reasons=dict(Counter(b.reason for b in window.bad)), severities=severities,
    )
    batch = {
        "monitor": monitor.name, "first_id": result.first_id, "last_id": result.last_id,
        "rows": result.rows, "flagged": result.flagged, "quarantined": result.quarantined,
        "model_version": result.model_version, "started_at": started,
        "newest_timestamp": newest, "duration_seconds": 0.0,
    }
    batch["duration_seconds"] = time.perf_counter() - t0
    _commit(engine, monitor.name, cursor, window, flagged, batch, clock())
    return dataclasses.replace(result, duration_seconds=time.perf_counter() - t0)
