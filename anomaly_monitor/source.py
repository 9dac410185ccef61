"""The watched table: schema checks against the reflected table; training, gap and
count reads (a monitor's windows are read by :mod:`anomaly_monitor.reading`).

Identifiers from the configuration are never pasted into SQL: the table is
reflected, every configured name must be one of its columns, and queries are
built from the reflected ``Column`` objects (quoted by SQLAlchemy).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.config import TIMESTAMP_UNITS, MonitorSettings
from anomaly_monitor.reading.query import raw, select_rows
from anomaly_monitor.reading.values import (
    Window,
    epoch_unit,
    rows_to_window,
    to_timestamp,
)

NUMERIC_TYPES = (sa.Integer, sa.Float, sa.Numeric, sa.Boolean)
#: Rows per page when streaming training data.
TRAINING_PAGE_ROWS = 50_000
#: Ids per query when reading the rows found in gaps.
IDS_PER_QUERY = 500
#: A batch with at most this many open gap ranges has them read one by one (OR-ed);
#: with more (sparse ids), its ids are scanned once and filtered.
FEW_RANGES = 20


class SchemaError(ValueError):
    """The source table or a configured column is missing or has the wrong type."""


class IdsRestartedError(SchemaError):
    """The table's ids no longer continue from the cursor (the table was recreated,
    emptied or truncated with its sequence restarted): rows would go unscored."""


#: The start of the pause reason of a monitor whose next row's id cannot be read
#: within the statement timeout (re-checked at every poll: :func:`next_id`).
SLOW_READ = "reads time out: "


class SlowReadError(SchemaError):
    """Not even the id of the row after the cursor can be read within the database's
    statement timeout (a costly row-level-security policy or view)."""

    def __init__(self, source: SourceTable, after_id: int) -> None:
        super().__init__(
            f"{SLOW_READ}the row after id {after_id} in table {source.table.fullname!r} "
            "cannot be read within the statement timeout; make the table's row-level "
            "security policy or the view cheaper, or raise statement_timeout in the "
            "database URL (options=-c statement_timeout=...)")


@dataclass(frozen=True)
class SourceTable:
    """A monitor's reflected table and the columns it uses."""

    monitor: str
    table: sa.Table
    id_column: sa.Column[Any]
    timestamp_column: sa.Column[Any]
    features: tuple[str, ...]
    label_column: sa.Column[Any] | None = None
    #: A window monitor's entity column (host, device): not a feature.
    entity_column: sa.Column[Any] | None = None
    #: How epoch-number timestamps are read (see ``MonitorSettings.timestamp_unit``).
    timestamp_unit: str = "auto"
    #: Whether the source is a view (no transaction horizon on PostgreSQL).
    is_view: bool = False

    def feature_columns(self, names: Sequence[str] | None = None) -> list[sa.Column[Any]]:
        """The columns for ``names`` (default: the configured features), checked."""
        names = self.features if names is None else names
        columns = []
        for name in names:
            if name not in self.table.c:
                raise SchemaError(
                    f"monitor {self.monitor!r}: column {name!r} is missing from table "
                    f"{self.table.fullname!r}"
                )
            column = self.table.c[name]
            _check_numeric(self.monitor, self.table, column)
            columns.append(column)
        return columns

    @property
    def epoch_timestamps(self) -> bool:
        """Whether the timestamp column holds numbers (epoch time), not date/times."""
        return isinstance(self.timestamp_column.type, NUMERIC_TYPES)


def _check_numeric(monitor: str, table: sa.Table, column: sa.Column[Any]) -> None:
    if not isinstance(column.type, NUMERIC_TYPES):
        raise SchemaError(
            f"monitor {monitor!r}: feature column {column.name!r} of table {table.fullname!r} "
            f"has type {column.type}, not a numeric type"
        )


def _column(monitor: str, table: sa.Table, name: str, role: str) -> sa.Column[Any]:
    if name not in table.c:
        known = ", ".join(table.c.keys())
        raise SchemaError(
            f"monitor {monitor!r}: {role} {name!r} is not a column of table "
            f"{table.fullname!r} (columns: {known})"
        )
    return table.c[name]


def reflect_source(connection: sa.Connection, monitor: MonitorSettings) -> SourceTable:
    """Reflect and check the monitor's table; :class:`SchemaError` names what is wrong."""
    inspector = sa.inspect(connection)
    if monitor.schema is not None and monitor.schema not in inspector.get_schema_names():
        raise SchemaError(f"monitor {monitor.name!r}: schema {monitor.schema!r} does not exist")
    names = set(inspector.get_table_names(schema=monitor.schema))
    names |= set(inspector.get_view_names(schema=monitor.schema))
    if connection.dialect.name == "postgresql":
        names |= set(inspector.get_materialized_view_names(schema=monitor.schema))
    if monitor.table not in names:
        schema = monitor.schema or inspector.default_schema_name
        raise SchemaError(
            f"monitor {monitor.name!r}: table {monitor.table!r} does not exist in schema "
            f"{schema!r} of the database" + ("" if monitor.schema else
                                             " (set schema = \"...\" for another one)"))
    table = sa.Table(monitor.table, sa.MetaData(), schema=monitor.schema,
                     autoload_with=connection)
    id_column = _column(monitor.name, table, monitor.id_column, "id_column")
    if not isinstance(id_column.type, sa.Integer):
        raise SchemaError(
            f"monitor {monitor.name!r}: id_column {id_column.name!r} has type "
            f"{id_column.type}, not an integer type"
        )
    ts_column = _column(monitor.name, table, monitor.timestamp_column, "timestamp_column")
    label = (None if monitor.label_column is None
             else _column(monitor.name, table, monitor.label_column, "label_column"))
    entity = (None if monitor.entity_column is None
              else _column(monitor.name, table, monitor.entity_column, "entity_column"))
    if entity is not None and entity.name in (id_column.name, ts_column.name):
        raise SchemaError(f"monitor {monitor.name!r}: entity_column {entity.name!r} is the id "
                          "or timestamp column; name the column that says which host or "
                          "device a row is from")
    reserved = {id_column.name, ts_column.name} | {c.name for c in (label, entity) if c is not None}
    if monitor.features is None:
        features = tuple(c.name for c in table.c
                         if c.name not in reserved and isinstance(c.type, NUMERIC_TYPES))
        if not features:
            raise SchemaError(
                f"monitor {monitor.name!r}: table {table.fullname!r} has no numeric column "
                "besides the id and timestamp"
            )
    else:
        features = monitor.features
        for name in features:
            if name in reserved:
                raise SchemaError(
                    f"monitor {monitor.name!r}: {name!r} is the id, timestamp, label or "
                    "entity column and cannot be a feature"
                )
    views = set(inspector.get_view_names(schema=monitor.schema))
    if connection.dialect.name == "postgresql":
        views |= set(inspector.get_materialized_view_names(schema=monitor.schema))
    is_view = monitor.table in views
    if is_view and connection.dialect.name == "postgresql" and monitor.query_delay_seconds <= 0:
        raise SchemaError(
            f"monitor {monitor.name!r}: {monitor.table!r} is a view; PostgreSQL gives a "
            "view's rows no transaction id to hold a window back while older transactions "
            "are still open, so rows could be skipped: set query_delay_seconds (e.g. 60) "
            "to read rows once they are that old")
    source = SourceTable(monitor.name, table, id_column, ts_column, features, label, entity,
                         monitor.timestamp_unit, is_view)
    source.feature_columns()
    return source


def _in_ranges(ids: npt.NDArray[np.int64], ranges: Sequence[Sequence[int]]
               ) -> npt.NDArray[np.bool_]:
    """Which ``ids`` fall in the inclusive, disjoint ``ranges``."""
    ordered = sorted((int(a), int(b)) for a, b in ranges)
    starts = np.array([a for a, _ in ordered], dtype=np.int64)
    ends = np.array([b for _, b in ordered], dtype=np.int64)
    at = np.searchsorted(starts, ids, side="right") - 1
    return (at >= 0) & (ids <= ends[np.clip(at, 0, None)])


def read_gaps(
    connection: sa.Connection,
    source: SourceTable,
    spans: Sequence[Sequence[Sequence[int]]],
    up_to: int,
    *,
    features: Sequence[str] | None = None,
) -> Window:
    """Rows whose ids fall in the inclusive ranges of ``spans`` (one list of disjoint
    ranges per batch) and are at most ``up_to``.

    Per batch with many ranges, one index scan lists the ids between its first and
    last range, and only rows found inside a range are then read: the cost follows the
    ids the table has there, not the number of ranges (a table whose ids step by 10
    leaves a range between every two rows). A batch with ``FEW_RANGES`` or fewer has
    just those ranges looked up."""
    names = tuple(source.features if features is None else features)
    id_column = source.id_column
    found: list[int] = []
    for ranges in spans:
        if not ranges:
            continue
        if len(ranges) <= FEW_RANGES:  # a dense table's few gaps: read just those ids
            within = sa.or_(*(id_column.between(int(a), int(b)) for a, b in ranges))
            found += connection.execute(sa.select(id_column).where(
                within, id_column <= up_to)).scalars().all()
            continue
        lo, hi = min(int(a) for a, _ in ranges), min(max(int(b) for _, b in ranges), up_to)
        ids = np.fromiter(connection.execute(
            sa.select(id_column).where(id_column.between(lo, hi))).scalars(), dtype=np.int64)
        if ids.size:
            found += ids[_in_ranges(ids, ranges)].tolist()
    return read_ids(connection, source, found, features=names)


def read_ids(connection: sa.Connection, source: SourceTable, ids: Sequence[int], *,
             features: Sequence[str] | None = None) -> Window:
    """The rows with these ids (those the table still has), in id order."""
    names = tuple(source.features if features is None else features)
    rows: list[Any] = []
    unique = sorted({int(i) for i in ids})
    for start in range(0, len(unique), IDS_PER_QUERY):
        rows += connection.execute(select_rows(source, names).where(
            source.id_column.in_(unique[start:start + IDS_PER_QUERY]))).all()
    rows.sort(key=lambda r: r[0])
    return rows_to_window(rows, names, False, source.timestamp_unit)


def newest_id(connection: sa.Connection, source: SourceTable) -> int:
    """The largest id in the table, 0 when it is empty."""
    value = connection.execute(sa.select(sa.func.max(source.id_column))).scalar()
    return int(value) if value is not None else 0


def next_id(connection: sa.Connection, source: SourceTable, after_id: int) -> int | None:
    """The first id above ``after_id`` (its other columns are not read), or ``None``."""
    value = connection.execute(
        sa.select(source.id_column).where(source.id_column > after_id)
        .order_by(source.id_column).limit(1)).scalar()
    return int(value) if value is not None else None


def oldest_id(connection: sa.Connection, source: SourceTable) -> int | None:
    """The smallest id in the table, ``None`` when it is empty."""
    value = connection.execute(sa.select(sa.func.min(source.id_column))).scalar()
    return int(value) if value is not None else None


def count_after(connection: sa.Connection, source: SourceTable, after_id: int) -> int:
    """How many rows have an id above ``after_id`` (the backlog)."""
    query = sa.select(sa.func.count()).select_from(source.table).where(
        source.id_column > after_id)
    return int(connection.execute(query).scalar() or 0)


def _label_column(source: SourceTable) -> sa.Column[Any]:
    if source.label_column is None:
        raise SchemaError(f"monitor {source.monitor!r} has no label_column configured")
    return source.label_column


def epoch_scale(connection: sa.Connection, source: SourceTable) -> float:
    """Units per second of an epoch timestamp column: the configured unit, or with
    ``auto`` the unit of the newest row's value (seconds for an empty table)."""
    if source.timestamp_unit != "auto":
        return TIMESTAMP_UNITS[source.timestamp_unit]
    newest = connection.execute(
        sa.select(source.timestamp_column).where(source.timestamp_column.is_not(None))
        .order_by(source.id_column.desc()).limit(1)).scalar()
    try:
        return TIMESTAMP_UNITS[epoch_unit(float(newest))] if newest is not None else 1.0
    except (TypeError, ValueError):
        return 1.0


def _time_bounds(source: SourceTable, since: dt.datetime | None, until: dt.datetime | None,
                 scale: float) -> list[sa.ColumnElement[bool]]:
    """Rows stamped at or after ``since`` and before ``until`` (either may be ``None``);
    ``scale``: the epoch column's units per second (:func:`epoch_scale`)."""
    ts = source.timestamp_column
    conditions: list[sa.ColumnElement[bool]] = []
    for bound, inclusive in ((since, True), (until, False)):
        if bound is None:
            continue
        # An epoch column is compared in its unit, a date/time column as a datetime.
        value: Any = bound.timestamp() * scale if source.epoch_timestamps else bound
        parameter = sa.bindparam(None, value, type_=ts.type)
        conditions.append(ts >= parameter if inclusive else ts < parameter)
    return conditions


#: Time spans OR-ed in one query by :func:`ids_stamped_within`.
SPANS_PER_QUERY = 200


def ids_stamped_within(connection: sa.Connection, source: SourceTable, first_id: int,
                       last_id: int, spans: Sequence[tuple[dt.datetime, dt.datetime]],
                       ) -> npt.NDArray[np.int64]:
    """Ids in ``first_id..last_id`` of rows stamped within one of ``spans`` (each
    ``[start, end)``), sorted."""
    if not spans:
        return np.zeros(0, dtype=np.int64)
    scale = epoch_scale(connection, source)
    found: set[int] = set()
    for i in range(0, len(spans), SPANS_PER_QUERY):
        within = sa.or_(*(sa.and_(*_time_bounds(source, start, end, scale))
                          for start, end in spans[i:i + SPANS_PER_QUERY]))
        found.update(connection.execute(sa.select(source.id_column).where(
            source.id_column.between(first_id, last_id), within)).scalars())
    return np.array(sorted(found), dtype=np.int64)


def _training_bounds(
    connection: sa.Connection, source: SourceTable, since: dt.datetime | None,
    until: dt.datetime | None, limit: int | None,
    id_range: tuple[int | None, int | None] | None = None,
) -> list[sa.ColumnElement[bool]]:
    scale = epoch_scale(connection, source) if since or until else 1.0
    conditions = _time_bounds(source, since, until, scale)
    low, high = id_range or (None, None)
    if low is not None:
        conditions.append(source.id_column >= low)
    if high is not None:
        conditions.append(source.id_column <= high)
    if limit is not None:
        # The newest ``limit`` rows of the window: find the id where they start.
        start = connection.execute(
            sa.select(source.id_column).where(*conditions)
            .order_by(source.id_column.desc()).offset(limit - 1).limit(1)
        ).scalar()
        if start is not None:
            conditions.append(source.id_column >= start)
    return conditions


def count_training(connection: sa.Connection, source: SourceTable, *,
                   since: dt.datetime | None = None, until: dt.datetime | None = None,
                   id_range: tuple[int, int] | None = None) -> int:
    """How many rows :func:`read_training` reads with the same bounds (no limit)."""
    conditions = _training_bounds(connection, source, since, until, None, id_range)
    return int(connection.execute(sa.select(sa.func.count()).select_from(source.table)
                                  .where(*conditions)).scalar_one())


def read_training(
    connection: sa.Connection,
    source: SourceTable,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int | None = None,
    id_range: tuple[int | None, int | None] | None = None,
    with_label: bool = False,
    page_rows: int = TRAINING_PAGE_ROWS,
) -> Iterator[Window]:
    """Stream the training window in pages of ``page_rows``, oldest first (keyset paging).

    ``id_range`` (inclusive) narrows the window to known ids, e.g. the held-out rows
    (``limit`` then counts the newest rows inside it).
    """
    conditions = _training_bounds(connection, source, since, until, limit, id_range)
    after: int | None = None
    while True:
        query = select_rows(source, source.features,
                            _label_column(source) if with_label else None).where(*conditions)
        if after is not None:
            query = query.where(source.id_column > after)
        rows = connection.execute(query.order_by(source.id_column).limit(page_rows)).all()
        if not rows:
            return
        window = rows_to_window(rows, source.features, with_label, source.timestamp_unit)
        yield window
        after = window.last_id
        if len(rows) < page_rows:
            return


#: Every pause for restarted ids starts so: it is cleared by moving the cursor only.
RESTARTED = "ids restarted: "


def timestamp_at(connection: sa.Connection, source: SourceTable,
                 source_id: int) -> tuple[int, dt.datetime | None] | None:
    """The row with the highest id at or below ``source_id`` and its timestamp, as one
    plain indexed lookup reads it (the same whichever reader read the window)."""
    row = connection.execute(
        sa.select(source.id_column, raw(source.timestamp_column))
        .where(source.id_column <= source_id).order_by(source.id_column.desc()).limit(1)
    ).first()
    return None if row is None else (int(row[0]), to_timestamp(row[1], source.timestamp_unit))


def check_position(connection: sa.Connection, source: SourceTable, position: int,
                   position_timestamp: dt.datetime | None, *, caught_up: bool) -> None:
    """Raise :class:`IdsRestartedError` when the table no longer continues from the
    cursor. The evidence: the row at ``position`` holds another timestamp than when the
    cursor moved there (``position_timestamp``); or that row is gone and a row below it
    is stamped later; or, ``caught_up`` (nothing after the cursor), the table's newest
    id is below the cursor and that row is stamped later than the cursor's (or either
    time is unknown). Deleting the newest rows alone is no restart."""
    hint = (f"rows with lower ids are not scored until the cursor is moved: "
            f"anomaly-monitor cursor {source.monitor} --to-start (or --reset-to ID)")
    where = f"table {source.table.fullname!r}"
    if position_timestamp is None and not caught_up:
        return
    below = timestamp_at(connection, source, position)
    if below is None:
        return  # nothing at or below the cursor: an empty table loses nothing yet
    found, stamp = below
    later = stamp is not None and position_timestamp is not None and stamp > position_timestamp
    if found == position and position_timestamp is not None and stamp != position_timestamp:
        raise IdsRestartedError(
            f"{RESTARTED}monitor {source.monitor!r}: the row at the cursor (id {position}) of "
            f"{where} changed: its timestamp was {position_timestamp.isoformat()}, now "
            f"{stamp.isoformat() if stamp else 'none'}; the table was replaced or its ids "
            f"restarted; {hint}")
    if found < position and later:
        raise IdsRestartedError(
            f"{RESTARTED}monitor {source.monitor!r}: the row at the cursor (id {position}) of "
            f"{where} is gone and id {found} below it is stamped later "
            f"({stamp.isoformat() if stamp else 'none'}); the table was replaced or its ids "
            f"restarted; {hint}")
    if caught_up and found < position and (later or stamp is None or position_timestamp is None):
        newest = connection.execute(sa.select(sa.func.max(source.id_column))).scalar()
        if newest is not None and int(newest) < position:
            raise IdsRestartedError(
                f"{RESTARTED}monitor {source.monitor!r}: the newest id of {where} is below "
                f"the cursor ({position}): its ids restarted (recreated, emptied, or "
                f"truncated with RESTART IDENTITY); {hint}")
