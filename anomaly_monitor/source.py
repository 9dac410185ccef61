"""The watched table: schema checks against the reflected table, and windowed reads.

Identifiers from the configuration are never pasted into SQL: the table is
reflected, every configured name must be one of its columns, and queries are
built from the reflected ``Column`` objects (quoted by SQLAlchemy).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.arrow_reader import (
    ArrowReader,
    ArrowUnavailableError,
    ArrowValues,
    ArrowWindow,
)
from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.tables import as_utc

NUMERIC_TYPES = (sa.Integer, sa.Float, sa.Numeric, sa.Boolean)
#: Rows per page when streaming training data.
TRAINING_PAGE_ROWS = 50_000
#: Id ranges per query when reading gaps.
RANGES_PER_QUERY = 200
XID_MODULUS = 2**32
FIRST_NORMAL_XID = 3
#: Quarantine reasons (the ``reason`` label of ``rows_quarantined_total``).
REASONS = ("null", "nan", "infinite", "non_numeric")


class SchemaError(ValueError):
    """The source table or a configured column is missing or has the wrong type."""


@dataclass(frozen=True)
class SourceTable:
    """A monitor's reflected table and the columns it uses."""

    monitor: str
    table: sa.Table
    id_column: sa.Column[Any]
    timestamp_column: sa.Column[Any]
    features: tuple[str, ...]
    label_column: sa.Column[Any] | None = None

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
    if monitor.table not in names:
        raise SchemaError(
            f"monitor {monitor.name!r}: table {monitor.table!r} does not exist in the database"
        )
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
    reserved = {id_column.name, ts_column.name} | ({label.name} if label is not None else set())
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
                    f"monitor {monitor.name!r}: {name!r} is the id, timestamp or label "
                    "column and cannot be a feature"
                )
    source = SourceTable(monitor.name, table, id_column, ts_column, features, label)
    source.feature_columns()
    return source


# -- values --------------------------------------------------------------------------------

def to_timestamp(value: Any) -> dt.datetime | None:
    """A source timestamp (datetime, date, epoch seconds or ISO text) as aware UTC."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return as_utc(value)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        seconds = float(value)
        if math.isfinite(seconds):
            try:
                return dt.datetime.fromtimestamp(seconds, dt.UTC)
            except (OverflowError, OSError, ValueError):
                return None
        return None
    if isinstance(value, str):
        try:
            return as_utc(dt.datetime.fromisoformat(value))
        except ValueError:
            pass
        try:  # numeric text (e.g. a NUMERIC epoch column read as text): epoch seconds
            return to_timestamp(float(value))
        except ValueError:
            return None
    return None


def _classify(value: Any) -> tuple[str, str] | None:
    """Why ``value`` cannot be scored, or ``None`` when it is a finite number."""
    if value is None:
        return "null", "NULL"
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        # Numeric text is a number, as numpy's fast conversion treats it.
        try:
            value = float(value)
        except ValueError:
            return "non_numeric", f"str {value[:40]!r}"
    if isinstance(value, int | float | Decimal):
        number = float(value)
        if math.isnan(number):
            return "nan", "NaN"
        if math.isinf(number):
            return "infinite", repr(number)
        return None
    return "non_numeric", f"{type(value).__name__} {str(value)[:40]!r}"


def json_value(value: Any) -> Any:
    """``value`` in a form JSON can hold (non-finite floats and odd types as text)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | Decimal):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if isinstance(value, bytes):
        return value[:64].hex()
    return str(value)


@dataclass
class BadRow:
    """A row that cannot be scored: its id, the reason code, a detail line, raw values."""

    source_id: int
    reason: str
    detail: str
    raw_values: dict[str, Any]


@dataclass
class Window:
    """Rows read after a cursor: scorable rows as a matrix, the others as :class:`BadRow`."""

    ids: npt.NDArray[np.int64]
    #: The driver's timestamp values of the scorable rows, parsed on demand (parsing
    #: every row's text timestamp would cost more than scoring it).
    raw_timestamps: Sequence[Any]
    values: npt.NDArray[np.float64]
    bad: list[BadRow] = field(default_factory=list)
    labels: npt.NDArray[np.float64] | None = None
    last_id: int | None = None
    held_back: int | None = None
    horizon: int | None = None

    def truncate(self, below_id: int) -> None:
        """Drop the rows with ids at or above ``below_id``."""
        keep = self.ids < below_id
        self.raw_timestamps = [t for t, k in zip(self.raw_timestamps, keep, strict=True) if k]
        self.ids, self.values = self.ids[keep], self.values[keep]
        if self.labels is not None:
            self.labels = self.labels[keep]
        self.bad = [b for b in self.bad if b.source_id < below_id]
        remaining = [*self.ids.tolist(), *(b.source_id for b in self.bad)]
        self.last_id = max(remaining) if remaining else None

    def timestamp(self, index: int) -> dt.datetime | None:
        """The timestamp of scorable row ``index`` as aware UTC (``None`` if unreadable)."""
        return to_timestamp(self.raw_timestamps[index])

    def newest_timestamp(self) -> dt.datetime | None:
        """The timestamp of the scorable row with the highest id."""
        return self.timestamp(len(self.raw_timestamps) - 1) if self.raw_timestamps else None

    def span(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        """The timestamps of the first and last scorable rows (by id)."""
        return (self.timestamp(0), self.newest_timestamp()) if self.raw_timestamps \
            else (None, None)

    @property
    def size(self) -> int:
        """Rows read, scorable and quarantined."""
        return len(self.ids) + len(self.bad)


def _describe(
    rows: Sequence[Sequence[Any]], names: Sequence[str], suspects: Sequence[int],
    matrix: npt.NDArray[np.float64],
) -> tuple[list[int], list[tuple[str, str, dict[str, Any]]]]:
    """Which ``suspects`` cannot be scored, and why; a suspect that turns out to hold
    numbers after all gets them written into ``matrix``."""
    bad, reasons = [], []
    for i in suspects:
        problems = [(name, _classify(v)) for name, v in zip(names, rows[i], strict=True)]
        problems = [(name, p) for name, p in problems if p is not None]
        if not problems:
            matrix[i] = [float(v) for v in rows[i]]
            continue
        reason = problems[0][1][0]
        detail = "; ".join(f"{name}: {p[1]}" for name, p in problems[:5])
        raw = {name: json_value(v) for name, v in zip(names, rows[i], strict=True)}
        bad.append(i)
        reasons.append((reason, detail, raw))
    return bad, reasons


def _to_matrix(
    rows: Sequence[Sequence[Any]], names: Sequence[str]
) -> tuple[npt.NDArray[np.float64], list[int], list[tuple[str, str, dict[str, Any]]]]:
    """Convert raw feature tuples; returns the matrix, bad row indices and their reasons."""
    try:
        matrix = np.array(rows, dtype=np.float64).reshape(len(rows), len(names))
        suspects = np.flatnonzero(~np.isfinite(matrix).all(axis=1)).tolist()
    except (TypeError, ValueError):
        matrix = np.full((len(rows), len(names)), np.nan)
        suspects = list(range(len(rows)))
    return matrix, *_describe(rows, names, suspects, matrix)


def _window(
    rows: Sequence[Sequence[Any]], features: Sequence[str], with_label: bool
) -> Window:
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    first = 3 if with_label else 2
    matrix, bad_index, reasons = _to_matrix([tuple(r[first:]) for r in rows], features)
    keep = np.ones(len(rows), dtype=bool)
    keep[bad_index] = False
    labels = None
    if with_label:
        labels = np.array([float(r[2]) if _classify(r[2]) is None else np.nan for r in rows])
        labels = labels[keep]
    bad = [BadRow(int(ids[i]), *reasons[k]) for k, i in enumerate(bad_index)]
    stamps = [r[1] for r, k in zip(rows, keep, strict=True) if k]
    return Window(ids[keep], stamps, matrix[keep], bad, labels,
                  int(ids[-1]) if len(ids) else None)


def _from_arrow(batch: ArrowWindow, features: Sequence[str]) -> Window:
    """A window from Arrow columns: NULL, NaN and infinite values are quarantined as
    on the plain path."""
    suspects = np.flatnonzero(~np.isfinite(batch.values).all(axis=1) | batch.nulls.any(axis=1))
    raw = [[None if null else value for value, null in zip(batch.values[i], batch.nulls[i],
                                                            strict=True)]
           for i in suspects]
    bad_index, reasons = _describe(raw, features, range(len(raw)), batch.values[suspects])
    keep = np.ones(len(batch.ids), dtype=bool)
    keep[suspects[bad_index]] = False
    bad = [BadRow(int(batch.ids[suspects[k]]), *reasons[n]) for n, k in enumerate(bad_index)]
    stamps = batch.timestamps if keep.all() else batch.timestamps.filter(keep)
    return Window(batch.ids[keep], ArrowValues(stamps), batch.values[keep], bad, None,
                  int(batch.ids[-1]) if len(batch.ids) else None)


def _raw(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    # NullType: the driver's value as is, so that a malformed value reaches the
    # quarantine (or a None timestamp) instead of failing in a result processor.
    return sa.type_coerce(column, sa.types.NullType()).label(column.name)


def _select(source: SourceTable, features: Sequence[str], with_label: bool) -> sa.Select[Any]:
    columns = [source.id_column, _raw(source.timestamp_column)]
    if with_label:
        if source.label_column is None:
            raise SchemaError(f"monitor {source.monitor!r} has no label_column configured")
        columns.append(_raw(source.label_column))
    columns += [_raw(c) for c in source.feature_columns(features)]
    return sa.select(*columns)


def _bigint(expression: str) -> sa.ColumnElement[int]:
    # xid8 and xid have no cast to bigint; their text form does.
    return sa.cast(sa.cast(sa.literal_column(expression), sa.Text), sa.BigInteger)


def horizon_columns() -> list[sa.ColumnElement[int]]:
    """PostgreSQL: each row's ``xmin``, and the statement snapshot's horizon (the oldest
    transaction still running, ``pg_snapshot_xmin``), as the last two columns."""
    return [_bigint("xmin").label("_xmin"),
            _bigint("pg_snapshot_xmin(pg_current_snapshot())").label("_horizon")]


def committed_mask(xids: npt.ArrayLike, horizon: int) -> npt.NDArray[np.bool_]:
    """Which 32-bit transaction ids precede the 64-bit ``horizon`` (mod 2**32); frozen
    and bootstrap ids always do."""
    xids = np.asarray(xids, dtype=np.int64)
    distance = (horizon - xids) % XID_MODULUS
    return (xids < FIRST_NORMAL_XID) | ((distance > 0) & (distance < XID_MODULUS // 2))


def committed_before(xid: int, horizon: int) -> bool:
    """Whether 32-bit transaction id ``xid`` precedes the 64-bit ``horizon`` (mod 2**32)."""
    return bool(committed_mask([xid], horizon)[0])


def _first_held(xmins: npt.ArrayLike, horizon: int) -> int:
    """The index of the first row written by a transaction not committed before
    ``horizon`` (the number of rows when there is none)."""
    held = np.flatnonzero(~committed_mask(xmins, horizon))
    return int(held[0]) if held.size else len(np.asarray(xmins))


def _first_young(stamps: Sequence[Any], ready_before: dt.datetime | None, stop: int) -> int:
    """The index of the first of ``stamps[:stop]`` not older than ``ready_before``
    (``len(stamps)`` when there is none)."""
    if ready_before is not None:
        for i in range(stop):
            stamp = to_timestamp(stamps[i])
            if stamp is not None and stamp >= ready_before:
                return i
    return len(stamps)


def _cut_at(ids: Sequence[int], young: int, held: int) -> tuple[int, int | None]:
    """Where the window ends, and the id the horizon held back (``None`` when a young
    row, not the horizon, ends it)."""
    return (held, int(ids[held])) if held < young else (young, None)


def _read_arrow(
    arrow: ArrowReader, build: Callable[[int], sa.Select[Any]], after_id: int,
    shape: Hashable, source: SourceTable, names: Sequence[str], limit: int,
    ready_before: dt.datetime | None, hold_back: bool,
) -> tuple[Window, int | None, int | None] | None:
    """The window through the Arrow path, the id the horizon held back and the
    horizon; ``None`` when the plain path must read it. A full window that nothing
    cut has the next one read ahead."""
    try:
        table = arrow.fetch(shape, build, after_id, expected_rows=limit)
        batch = ArrowWindow.from_table(
            table, len(names), with_xmin=hold_back,
            numeric_text=arrow.dialect.name == "postgresql",
            numeric_timestamps=isinstance(source.timestamp_column.type, NUMERIC_TYPES))
    except ArrowUnavailableError:
        return None
    except Exception as exc:  # e.g. a column Arrow cannot convert to float
        arrow.stand_aside(exc)
        return None
    if ready_before is not None:  # a page read ahead was read that much earlier
        ready_before -= dt.timedelta(seconds=arrow.page_age_seconds)
    xmin = batch.horizon
    n = len(batch.ids)
    held = n if batch.xmins is None or xmin is None else _first_held(batch.xmins, xmin)
    young = n if ready_before is None else batch.first_young(ready_before)
    if young is None:  # timestamps held as text or numbers: parse them up to the horizon
        young = _first_young(ArrowValues(batch.timestamps), ready_before, min(held + 1, n))
    stop, held_back = _cut_at(batch.ids, young, held)
    if stop == n == limit:  # a backlog: read the next page while this one is scored
        arrow.read_ahead(shape, build, int(batch.ids[-1]), limit)
    return _from_arrow(batch.head(stop), names), held_back, xmin


def read_window(
    connection: sa.Connection,
    source: SourceTable,
    after_id: int,
    limit: int,
    *,
    features: Sequence[str] | None = None,
    ready_before: dt.datetime | None = None,
    hold_back: bool = False,
    arrow: ArrowReader | None = None,
    plain: bool = False,
) -> Window:
    """Up to ``limit`` rows with id above ``after_id``, in id order.

    With ``ready_before``, the window stops at the first row whose timestamp is
    not older than it. With ``hold_back`` (PostgreSQL), it also stops at the first
    row written by a transaction at or after the oldest one still open: a row
    with a lower id may still be in flight in that transaction, and reading past
    it would skip that row: the snapshot's *horizon*, a transaction id, is in
    ``Window.horizon``, and ``Window.held_back`` is the id where it stopped the window.
    With ``arrow``, the rows are read through its ADBC connection when it can; with
    ``plain`` too, this window is read by the plain path (it is expected to be small)
    and, if it comes back full, the next one is read ahead through ``arrow``.
    """
    names = tuple(source.features if features is None else features)

    def build(after: int) -> sa.Select[Any]:
        query = (_select(source, names, False).where(source.id_column > after)
                 .order_by(source.id_column).limit(limit))
        return query.add_columns(*horizon_columns()) if hold_back else query

    shape = (source.table.fullname, source.id_column.name, source.timestamp_column.name,
             names, limit, hold_back)
    fast = None if arrow is None or plain else _read_arrow(
        arrow, build, after_id, shape, source, names, limit, ready_before, hold_back)
    if fast is not None:
        window, held_back, xmin = fast
    else:
        rows = connection.execute(build(after_id)).all()
        xmin = int(rows[0][-1]) if hold_back and rows else None
        held = len(rows) if xmin is None else _first_held([r[-2] for r in rows], xmin)
        young = _first_young([r[1] for r in rows], ready_before, min(held + 1, len(rows)))
        stop, held_back = _cut_at([r[0] for r in rows], young, held)
        if arrow is not None and stop == len(rows) == limit:  # a backlog: read ahead
            arrow.read_ahead(shape, build, rows[-1][0], limit)
        rows = rows[:stop]
        window = _window([r[:-2] for r in rows] if hold_back else rows, names, False)
    window.held_back, window.horizon = held_back, xmin
    return window


def read_ids(
    connection: sa.Connection,
    source: SourceTable,
    ranges: Sequence[tuple[int, int]],
    up_to: int,
    *,
    features: Sequence[str] | None = None,
) -> Window:
    """Rows whose ids fall in the inclusive ``ranges`` and are at most ``up_to``."""
    names = tuple(source.features if features is None else features)
    rows: list[Any] = []
    # Chunks keep the OR expression below SQLite's expression-depth limit (1000).
    for lo in range(0, len(ranges), RANGES_PER_QUERY):
        within = sa.or_(*(source.id_column.between(a, b)
                          for a, b in ranges[lo:lo + RANGES_PER_QUERY]))
        rows += connection.execute(_select(source, names, False)
                                   .where(within, source.id_column <= up_to)).all()
    unique = {r[0]: r for r in rows}  # ranges from different batches never overlap; be sure
    return _window([unique[i] for i in sorted(unique)], names, False)


def newest_id(connection: sa.Connection, source: SourceTable) -> int:
    """The largest id in the table, 0 when it is empty."""
    value = connection.execute(sa.select(sa.func.max(source.id_column))).scalar()
    return int(value) if value is not None else 0


def count_after(connection: sa.Connection, source: SourceTable, after_id: int) -> int:
    """How many rows have an id above ``after_id`` (the backlog)."""
    query = sa.select(sa.func.count()).select_from(source.table).where(
        source.id_column > after_id)
    return int(connection.execute(query).scalar() or 0)


def _training_bounds(
    connection: sa.Connection, source: SourceTable, since: dt.datetime | None,
    until: dt.datetime | None, limit: int | None,
) -> list[sa.ColumnElement[bool]]:
    ts = source.timestamp_column
    conditions: list[sa.ColumnElement[bool]] = []
    for bound, inclusive in ((since, True), (until, False)):
        if bound is None:
            continue
        # An epoch column is compared in seconds, a date/time column as a datetime.
        value: Any = bound.timestamp() if isinstance(ts.type, NUMERIC_TYPES) else bound
        parameter = sa.bindparam(None, value, type_=ts.type)
        conditions.append(ts >= parameter if inclusive else ts < parameter)
    if limit is not None:
        # The newest ``limit`` rows of the window: find the id where they start.
        start = connection.execute(
            sa.select(source.id_column).where(*conditions)
            .order_by(source.id_column.desc()).offset(limit - 1).limit(1)
        ).scalar()
        if start is not None:
            conditions.append(source.id_column >= start)
    return conditions


def read_training(
    connection: sa.Connection,
    source: SourceTable,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int | None = None,
    id_range: tuple[int, int] | None = None,
    with_label: bool = False,
    page_rows: int = TRAINING_PAGE_ROWS,
) -> Iterator[Window]:
    """Stream the training window in pages of ``page_rows``, oldest first (keyset paging).

    ``id_range`` (inclusive) narrows the window to known ids, e.g. the held-out rows.
    """
    conditions = _training_bounds(connection, source, since, until, limit)
    if id_range is not None:
        conditions += [source.id_column >= id_range[0], source.id_column <= id_range[1]]
    after: int | None = None
    while True:
        query = _select(source, source.features, with_label).where(*conditions)
        if after is not None:
            query = query.where(source.id_column > after)
        rows = connection.execute(query.order_by(source.id_column).limit(page_rows)).all()
        if not rows:
            return
        window = _window(rows, source.features, with_label)
        yield window
        after = window.last_id
        if len(rows) < page_rows:
            return
