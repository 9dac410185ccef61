"""Read-only views for ``status`` and ``anomalies``: plain dicts, ready for JSON."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings, lease_duration
from anomaly_monitor.cursors import lease_holder, list_standbys, read_cursor, reset_cursor
from anomaly_monitor.drift import stored_report
from anomaly_monitor.entities import count_entities, entity_key
from anomaly_monitor.incidents import incident_gap, open_count, top_features
from anomaly_monitor.reading.cancel import bounded
from anomaly_monitor.registry import active_version, get_version
from anomaly_monitor.source import (
    SchemaError,
    SourceTable,
    count_after,
    oldest_id,
    reflect_source,
)
from anomaly_monitor.suppression import spans_between
from anomaly_monitor.tables import (
    LABEL_FILTERS,
    anomalies,
    as_utc,
    batches,
    cursors,
    incidents,
    quarantine,
    utcnow,
)

RECENT_WINDOW = dt.timedelta(hours=24)
#: PostgreSQL: ``status`` gives up counting one monitor's backlog after this long, so
#: that one slow table does not hold up (or fail) every monitor's line.
STATUS_COUNT_TIMEOUT_MS = 5000


def _bounded_count(connection: sa.Connection, source: SourceTable, position: int) -> int:
    """The backlog; -1 when counting it took over ``STATUS_COUNT_TIMEOUT_MS``."""
    count = bounded(connection, STATUS_COUNT_TIMEOUT_MS,
                    lambda: count_after(connection, source, position))
    return -1 if count is None else count


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


def _challenger(connection: sa.Connection, monitor: MonitorSettings) -> dict[str, Any] | None:
    """The challenger in shadow: its version, rows scored and gates passed so far."""
    from anomaly_monitor.retraining import judge

    judgement = judge(connection, monitor)
    if judgement is None:
        return None
    return {"version": judgement.version, "shadow_rows": judgement.totals.rows,
            "gates_passed": [g.name for g in judgement.gates if g.passed is True],
            "gates_failed": [g.name for g in judgement.gates if g.passed is False],
            "promote": monitor.shadow.promote}


def monitor_status(connection: sa.Connection, monitor: MonitorSettings) -> dict[str, Any]:
    """Active version, threshold, cursor, backlog, lag, last batch, recent anomalies."""
    now = utcnow()
    status: dict[str, Any] = {"monitor": monitor.name, "table": monitor.table}
    number = active_version(connection, monitor.name)
    version = get_version(connection, monitor.name, number) if number is not None else None
    status["active_version"] = number
    status["kind"] = version.kind if version else None
    # A window monitor's entities with a baseline under the active version.
    status["entities"] = (count_entities(connection, monitor.name, number)
                          if version is not None and version.training.get("window") else None)
    status["incidents_open"] = open_count(connection, monitor.name)
    status["incident_gap_seconds"] = round(incident_gap(monitor, version), 3)
    status["alert_severity"] = monitor.incidents.alert_severity
    # Suppression windows open now (by wall time; they apply to the rows' timestamps).
    status["suppressed_now"] = [
        {"window": span.name, "entity": span.entity, "until": _iso(span.end)}
        for span in spans_between(connection, monitor.name, monitor.suppress, now, now)]
    status["challenger"] = _challenger(connection, monitor)
    stored = stored_report(connection, monitor.name)
    status["drift"] = ({key: stored[0][key] for key in ("drift_score", "drifted_features",
                                                         "score_drift", "measured")}
                       if stored is not None and stored[0].get("version") == number else None)
    status["threshold"] = version.threshold if version else None
    status["threshold_method"] = version.threshold_method if version else None
    cursor = read_cursor(connection, monitor.name)
    status["cursor"] = cursor.position if cursor else None
    status["generation"] = cursor.generation if cursor else None
    status["paused"] = bool(cursor and cursor.paused)
    status["pause_reason"] = cursor.pause_reason if cursor else None
    status["lease"] = lease_holder(connection, monitor.name)
    # A standby renews its row every third of a lease: listed while seen within two.
    status["standbys"] = list_standbys(connection, monitor.name, 2 * lease_duration(monitor))
    below = connection.execute(sa.select(cursors.c.rows_below, cursors.c.below_checked_at)
                               .where(cursors.c.monitor == monitor.name)).first()
    status["rows_below_cursor"] = below.rows_below if below is not None else None
    status["rows_below_checked_at"] = _iso(as_utc(below.below_checked_at)) if below else None
    # The lease is renewed at every poll's start: when the worker last polled.
    lease = status["lease"]
    status["seconds_since_poll"] = None if lease is None or lease["seconds_left"] is None \
        else max(0.0, round(lease_duration(monitor) - lease["seconds_left"], 1))
    try:
        source = reflect_source(connection, monitor)
        status["table"] = source.table.fullname if source.table.schema else \
            f"{sa.inspect(connection).default_schema_name}.{source.table.name}"
        status["backlog"] = _bounded_count(connection, source, cursor.position) \
            if cursor else None
        status["source_error"] = None if status["backlog"] != -1 else (
            f"counting the rows after the cursor took over {STATUS_COUNT_TIMEOUT_MS} ms")
        if status["backlog"] == -1:
            status["backlog"] = None
    except SchemaError as exc:
        status["backlog"] = None
        status["source_error"] = str(exc)
    last = _last_batch(connection, monitor.name)
    status["last_batch"] = last
    newest = last["newest_timestamp"] if last else None
    lag = (now - dt.datetime.fromisoformat(newest)).total_seconds() if newest else None
    # A newest row stamped ahead of this clock is no lag (the metric clamps it too).
    status["lag_seconds"] = round(max(0.0, lag), 1) if lag is not None else None
    status["newest_in_future"] = lag is not None and lag < 0
    status["quarantined"] = quarantine_counts(connection, monitor.name)
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


def _with_label(column: sa.Column[Any], label: str | None) -> list[sa.ColumnElement[bool]]:
    """The condition of a ``--label`` filter (none without one)."""
    if label is None:
        return []
    if label not in LABEL_FILTERS:
        raise ValueError(f"label must be one of {', '.join(LABEL_FILTERS)}; got {label!r}")
    return [column.is_(None) if label == "none" else column == label]


def list_anomalies(
    connection: sa.Connection,
    monitor: str,
    *,
    since: dt.datetime | None = None,
    scored_since: dt.datetime | None = None,
    entity: str | None = None,
    label: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Flagged rows of ``monitor`` (``since``: stamped at or after it, by the row's own
    timestamp; ``scored_since``: scored at or after it; ``entity``: of that entity of a
    window monitor; ``label``: labelled so, ``"none"`` unlabelled), newest cursor
    generation and source id first."""
    query = sa.select(anomalies).where(anomalies.c.monitor == monitor,
                                       *_with_label(anomalies.c.label, label))
    if entity is not None:
        query = query.where(anomalies.c.entity == entity_key(entity))
    if since is not None:
        query = query.where(anomalies.c.source_timestamp >= since)
    if scored_since is not None:
        query = query.where(anomalies.c.scored_at >= scored_since)
    rows = connection.execute(query.order_by(anomalies.c.generation.desc(),
                                             anomalies.c.source_id.desc()).limit(limit)).all()
    return [
        {
            "source_id": r.source_id, "source_timestamp": _iso(as_utc(r.source_timestamp)),
            "score": r.score, "threshold": r.threshold, "severity": round(r.severity, 1),
            "model_version": r.model_version, "top_features": r.contributions,
            "scored_at": _iso(as_utc(r.scored_at)), "generation": r.generation,
            "entity": r.entity, "incident_id": r.incident_id, "label": r.label,
            "suppressed_by": r.suppressed_by,
        }
        for r in rows
    ]


def list_incidents(
    connection: sa.Connection,
    monitor: str,
    *,
    only_open: bool = False,
    since: dt.datetime | None = None,
    entity: str | None = None,
    label: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Incidents of ``monitor`` (``only_open``: open ones; ``since``: with a flag stamped
    at or after it; ``entity``: of that entity; ``label``: labelled so, ``"none"``
    unlabelled), newest first."""
    query = sa.select(incidents).where(incidents.c.monitor == monitor,
                                       *_with_label(incidents.c.label, label))
    if only_open:
        query = query.where(incidents.c.state == "open")
    if since is not None:
        query = query.where(incidents.c.last_timestamp >= since)
    if entity is not None:
        query = query.where(incidents.c.entity == entity_key(entity))
    rows = connection.execute(query.order_by(incidents.c.generation.desc(),
                                             incidents.c.last_timestamp.desc(),
                                             incidents.c.id.desc()).limit(limit)).all()
    return [
        {
            "id": r.id, "entity": r.entity, "state": r.state, "label": r.label,
            "first_source_id": r.first_source_id, "last_source_id": r.last_source_id,
            "first_timestamp": _iso(as_utc(r.first_timestamp)),
            "last_timestamp": _iso(as_utc(r.last_timestamp)), "rows": r.rows,
            "max_severity": round(r.max_severity, 1),
            "top_features": top_features(r.feature_shares, r.rows),
            "model_version": r.model_version, "opened_at": _iso(as_utc(r.opened_at)),
            "closed_at": _iso(as_utc(r.closed_at)), "generation": r.generation,
        }
        for r in rows
    ]


def list_quarantine(
    connection: sa.Connection,
    monitor: str,
    *,
    reason: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Quarantined rows of ``monitor`` (``reason``: of that reason only; ``since``:
    quarantined at or after it), newest first."""
    query = sa.select(quarantine).where(quarantine.c.monitor == monitor)
    if reason is not None:
        query = query.where(quarantine.c.reason == reason)
    if since is not None:
        query = query.where(quarantine.c.quarantined_at >= since)
    rows = connection.execute(query.order_by(quarantine.c.id.desc()).limit(limit)).all()
    return [{"source_id": r.source_id, "reason": r.reason, "detail": r.detail,
             "raw_values": r.raw_values, "quarantined_at": _iso(as_utc(r.quarantined_at)),
             "generation": r.generation} for r in rows]


def quarantine_counts(connection: sa.Connection, monitor: str) -> dict[str, int]:
    """The monitor's quarantined rows by reason."""
    return {reason: int(count) for reason, count in connection.execute(
        sa.select(quarantine.c.reason, sa.func.count()).where(quarantine.c.monitor == monitor)
        .group_by(quarantine.c.reason))}


def cursor_report(connection: sa.Connection, monitor: MonitorSettings) -> dict[str, Any]:
    """The monitor's cursor, the table's id range after it, pause and lease."""
    cursor = read_cursor(connection, monitor.name)
    if cursor is None:
        raise LookupError(f"monitor {monitor.name!r} has no cursor yet (no model was "
                          f"activated; run: anomaly-monitor train {monitor.name})")
    source = reflect_source(connection, monitor)
    newest = connection.execute(sa.select(sa.func.max(source.id_column))).scalar()
    return {"monitor": monitor.name, "table": source.table.fullname,
            "position": cursor.position, "generation": cursor.generation,
            "newest_id": newest, "backlog": count_after(connection, source, cursor.position),
            "paused": cursor.paused, "pause_reason": cursor.pause_reason,
            "lease": lease_holder(connection, monitor.name)}


def move_cursor(connection: sa.Connection, monitor: MonitorSettings, target: int | str, *,
                force: bool = False) -> dict[str, Any]:
    """Move the cursor to an id, to the table's ``"start"`` (before its lowest id) or
    ``"end"`` (its newest id); see :func:`~anomaly_monitor.cursors.reset_cursor`."""
    source = reflect_source(connection, monitor)
    if target == "start":
        lowest = oldest_id(connection, source)
        # Not above 0: a row with a low id may still be in flight right after a restart.
        position = min(0, lowest - 1) if lowest is not None else 0
    elif target == "end":
        newest = connection.execute(sa.select(sa.func.max(source.id_column))).scalar()
        position = int(newest) if newest is not None else 0
    else:
        position = int(target)
        newest = connection.execute(sa.select(sa.func.max(source.id_column))).scalar()
        if position > (int(newest) if newest is not None else 0) and not force:
            raise ValueError(
                f"monitor {monitor.name!r}: --reset-to {position} is past the newest id of "
                f"table {source.table.fullname!r} ({newest}): rows inserted up to there would "
                "never be scored; use --to-end to skip to the newest row, or --force")
    cursor = read_cursor(connection, monitor.name)
    skipped = 0
    if cursor is not None and position > cursor.position:
        skipped = int(connection.execute(sa.select(sa.func.count()).select_from(source.table)
                                         .where(source.id_column > cursor.position,
                                                source.id_column <= position)).scalar())
    reset = reset_cursor(connection, monitor.name, position, force=force, skipped_rows=skipped)
    parts = [f"monitor {monitor.name}: cursor moved from {reset.old_position} to "
             f"{reset.new_position}"]
    if reset.new_generation != reset.old_generation:
        parts.append(f"; generation {reset.old_generation} -> {reset.new_generation} (rows "
                     f"scored from here are recorded beside the older records of the same "
                     f"ids; {reset.gaps_closed} batch(es) with open id gaps closed)")
    if reset.was_paused:
        parts.append("; the monitor was paused and is resumed")
    if reset.lease_taken_from:
        parts.append(f"; the lease was taken from {reset.lease_taken_from}, whose current "
                     f"batch rolls back")
    return {"old_position": reset.old_position, "position": reset.new_position,
            "old_generation": reset.old_generation, "generation": reset.new_generation,
            "resumed": reset.was_paused, "lease_taken_from": reset.lease_taken_from,
            "summary": "".join(parts)}
