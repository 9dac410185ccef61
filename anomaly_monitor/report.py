"""Read-only views for ``status`` and ``anomalies``: plain dicts, ready for JSON."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.cursors import lease_holder, read_cursor
from anomaly_monitor.registry import active_version, get_version
from anomaly_monitor.source import SchemaError, count_after, reflect_source
from anomaly_monitor.tables import anomalies, as_utc, batches, utcnow

RECENT_WINDOW = dt.timedelta(hours=24)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _last_batch(connection: sa.Connection, monitor: str) -> dict[str, Any] | None:
    row = connection.execute(
        sa.select(batches).where(batches.c.monitor == monitor)
        .order_by(batches.c.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    return {
        "started_at": _iso(as_utc(row.started_at)), "first_id": row.first_id,
        "last_id": row.last_id, "rows": row.rows, "flagged": row.flagged,
        "quarantined": row.quarantined, "model_version": row.model_version,
        "duration_seconds": round(row.duration_seconds, 4),
        "newest_timestamp": _iso(as_utc(row.newest_timestamp)),
    }


def monitor_status(connection: sa.Connection, monitor: MonitorSettings) -> dict[str, Any]:
    """Active version, threshold, cursor, backlog, lag, last batch, recent anomalies."""
    now = utcnow()
    status: dict[str, Any] = {"monitor": monitor.name, "table": monitor.table}
    number = active_version(connection, monitor.name)
    version = get_version(connection, monitor.name, number) if number is not None else None
    status["active_version"] = number
    status["kind"] = version.kind if version else None
    status["threshold"] = version.threshold if version else None
    status["threshold_method"] = version.threshold_method if version else None
    cursor = read_cursor(connection, monitor.name)
    status["cursor"] = cursor.position if cursor else None
    status["paused"] = bool(cursor and cursor.paused)
    status["pause_reason"] = cursor.pause_reason if cursor else None
    status["lease"] = lease_holder(connection, monitor.name)
    try:
        source = reflect_source(connection, monitor)
        status["backlog"] = count_after(connection, source, cursor.position) if cursor else None
        status["source_error"] = None
    except SchemaError as exc:
        status["backlog"] = None
        status["source_error"] = str(exc)
    last = _last_batch(connection, monitor.name)
    status["last_batch"] = last
    newest = last["newest_timestamp"] if last else None
    status["lag_seconds"] = (
        round((now - dt.datetime.fromisoformat(newest)).total_seconds(), 1) if newest else None
    )
    status["anomalies_24h"] = int(connection.execute(
        sa.select(sa.func.count()).select_from(anomalies).where(
            anomalies.c.monitor == monitor.name, anomalies.c.scored_at >= now - RECENT_WINDOW)
    ).scalar() or 0)
    if number is None:
        status["state"] = "no model"
    elif status["paused"]:
        status["state"] = "paused"
    else:
        status["state"] = "active"
    return status


def list_anomalies(
    connection: sa.Connection,
    monitor: str,
    *,
    since: dt.datetime | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Flagged rows of ``monitor``, newest source id first."""
    query = sa.select(anomalies).where(anomalies.c.monitor == monitor)
    if since is not None:
        query = query.where(anomalies.c.scored_at >= since)
    rows = connection.execute(query.order_by(anomalies.c.source_id.desc()).limit(limit)).all()
    return [
        {
            "source_id": r.source_id, "source_timestamp": _iso(as_utc(r.source_timestamp)),
            "score": r.score, "threshold": r.threshold, "severity": round(r.severity, 1),
            "model_version": r.model_version, "top_features": r.contributions,
            "scored_at": _iso(as_utc(r.scored_at)),
        }
        for r in rows
    ]
