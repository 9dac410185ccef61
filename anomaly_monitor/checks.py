"""What ``anomaly-monitor check`` verifies: everything ``train`` and ``run`` will need.

Every monitor is checked, and every problem reported (not just the first): its
hyperparameters, its table and columns, the read privilege on the table, that its
timestamps parse, that an active model's features are what the table offers and
that its artifact verifies; once for the database, the write privileges on the
``am_`` tables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa

from anomaly_monitor.config import ConfigError, MonitorSettings, Settings, check_model_params
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.reading.query import raw, select_rows
from anomaly_monitor.reading.values import epoch_unit, json_value, to_timestamp
from anomaly_monitor.registry import RegistryError, active_version, load_model
from anomaly_monitor.scoring import check_features
from anomaly_monitor.source import SchemaError, SourceTable, reflect_source
from anomaly_monitor.tables import (
    anomalies,
    batches,
    cursors,
    model_versions,
    quarantine,
    standbys,
)

#: Timestamps of this many of the newest rows are parsed.
TIMESTAMP_SAMPLE_ROWS = 200
#: What the daemon and ``train`` write, by table.
WRITES = {cursors: ("SELECT", "INSERT", "UPDATE"), anomalies: ("SELECT", "INSERT"),
          quarantine: ("SELECT", "INSERT", "DELETE"),  # a backfill re-reads read_timeout rows
          batches: ("SELECT", "INSERT", "UPDATE"),
          model_versions: ("SELECT", "INSERT", "UPDATE"),
          standbys: ("SELECT", "INSERT", "UPDATE", "DELETE")}
PERMISSION_DENIED = "42501"


@dataclass(frozen=True)
class Finding:
    """One line of the check: ``ok`` or a problem."""

    ok: bool
    message: str


def _ok(message: str) -> Finding:
    return Finding(True, message)


def _problem(message: str) -> Finding:
    return Finding(False, message)


def _denied(exc: sa.exc.DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == PERMISSION_DENIED or \
        "permission denied" in str(exc.orig).lower()


def _can_read(connection: sa.Connection, source: SourceTable) -> Finding | None:
    """A problem when the table cannot be read (a missing SELECT grant)."""
    try:
        with connection.begin_nested():
            connection.execute(select_rows(source, source.features).limit(1)).all()
    except sa.exc.DBAPIError as exc:
        if not _denied(exc):
            raise
        return _problem(f"monitor {source.monitor}: this database user may not read table "
                        f"{source.table.fullname!r} (GRANT SELECT ON {source.table.fullname} "
                        "TO the monitor's user)")
    return None


def _timestamps(connection: sa.Connection, source: SourceTable) -> Finding:
    """Whether the newest rows' timestamps parse (in the configured or detected unit)."""
    column = source.timestamp_column
    values = connection.execute(
        sa.select(raw(column)).where(column.is_not(None))
        .order_by(source.id_column.desc()).limit(TIMESTAMP_SAMPLE_ROWS)).scalars().all()
    bad = [v for v in values if to_timestamp(v, source.timestamp_unit) is None]
    name = f"monitor {source.monitor}: timestamp_column {column.name!r}"
    if bad:
        return _problem(
            f"{name} holds {len(bad)} of its newest {len(values)} values that are not times "
            f"(e.g. {json_value(bad[0])!r}); use a date/time column, ISO 8601 text or epoch "
            "numbers (timestamp_unit = \"s\", \"ms\", \"us\" or \"ns\")")
    if source.epoch_timestamps and values:
        unit = source.timestamp_unit
        detail = f"{epoch_unit(float(values[0]))} (detected)" if unit == "auto" else unit
        return _ok(f"{name}: epoch numbers in {detail}, newest "
                   f"{to_timestamp(values[0], unit).isoformat()}")  # type: ignore[union-attr]
    return _ok(f"{name}: {len(values)} newest values parse" if values else
               f"{name}: no rows yet")


def _model(connection: sa.Connection, monitor: MonitorSettings,
           source: SourceTable) -> Finding:
    number = active_version(connection, monitor.name)
    if number is None:
        return _ok(f"monitor {monitor.name}: no active model yet "
                   f"(run: anomaly-monitor train {monitor.name})")
    model = load_model(connection, monitor.name, number, device="cpu")
    check_features(monitor, model.version)
    source.feature_columns(model.version.features)
    trained = tuple(model.version.features)
    if monitor.features is None and set(trained) != set(source.features):
        added = sorted(set(source.features) - set(trained))
        gone = sorted(set(trained) - set(source.features))
        return _problem(
            f"monitor {monitor.name}: the active model (version {number}) was trained on "
            f"{len(trained)} features, the table now offers {len(source.features)}"
            + (f" (new: {', '.join(added)})" if added else "")
            + (f" (gone: {', '.join(gone)})" if gone else "")
            + f"; it scores its own {len(trained)} until you retrain: "
            f"anomaly-monitor train {monitor.name}")
    return _ok(f"monitor {monitor.name}: model version {number} verified "
               f"(sha256 {model.version.artifact_sha256[:12]})")


def check_config(settings: Settings) -> list[Finding]:
    """What the configuration file itself gets wrong beyond its syntax: each monitor's
    hyperparameter values (``epochs = -3``), before anything is said to be ok."""
    problems = []
    for monitor in settings.monitors:
        try:
            check_model_params(settings, monitor)
        except ConfigError as exc:
            problems.append(_problem(str(exc)))
    return problems or [_ok(f"config {settings.path}: ok ({len(settings.monitors)} "
                            "monitor(s))")]


def check_monitor(connection: sa.Connection, settings: Settings,
                  monitor: MonitorSettings) -> Iterator[Finding]:
    """Every finding for ``monitor`` but its hyperparameters (:func:`check_config`);
    stops early only when its table cannot be used."""
    try:
        source = reflect_source(connection, monitor)
    except SchemaError as exc:
        yield _problem(str(exc))
        return
    kind = "view" if source.is_view else "table"
    yield _ok(f"monitor {monitor.name}: {kind} {monitor.table} ok, "
              f"{len(source.features)} features ({', '.join(source.features)})")
    denied = _can_read(connection, source)
    if denied is not None:
        yield denied
        return
    yield _timestamps(connection, source)
    try:
        yield _model(connection, monitor, source)
    except (SchemaError, RegistryError) as exc:
        yield _problem(str(exc))
    cursor = read_cursor(connection, monitor.name)
    if cursor is not None and cursor.paused:
        yield _problem(f"monitor {monitor.name}: paused by the worker: {cursor.pause_reason}")


def check_writes(connection: sa.Connection) -> Finding:
    """Whether this user may write what the daemon and ``train`` write."""
    if connection.dialect.name == "sqlite":
        path = connection.engine.url.database
        if path and path != ":memory:" and not path.startswith("file:"):
            folder = os.path.dirname(os.path.abspath(path))
            if not os.access(path, os.W_OK) or not os.access(folder, os.W_OK):
                return _problem(f"the SQLite file {path} (or its folder, for the journal) is "
                                "not writable by this user")
        return _ok("am_ tables: writable")
    missing = []
    for table, privileges in WRITES.items():
        for privilege in privileges:
            allowed = connection.execute(sa.select(sa.func.has_table_privilege(
                table.name, privilege))).scalar()
            if not allowed:
                missing.append(f"{privilege} on {table.name}")
    if missing:
        return _problem("this database user lacks " + ", ".join(missing)
                        + " (the daemon pauses, trains and records batches there)")
    return _ok("am_ tables: writable")
