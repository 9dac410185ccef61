"""Arrow-native reads of the source table through ADBC drivers (SQLite files, PostgreSQL).

The plain path (SQLAlchemy over sqlite3 or psycopg) builds a Python tuple per row
and a Python object per value; converting those to numpy costs more than scoring
them. The ADBC drivers read a result straight into Arrow columns (PostgreSQL
through binary ``COPY``), which numpy takes over without per-row objects.

The query is the same SQLAlchemy ``Select`` the plain path runs
(:class:`~anomaly_monitor.reading.query.WindowQuery`), compiled once per shape;
identifiers come from the reflected table, quoted by SQLAlchemy. Any failure here
(a driver not installed, a value the driver cannot type, a lost connection) makes
the caller fall back to the plain path, which reads every value as it is and
quarantines what cannot be scored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.sql.compiler import SQLCompiler

from anomaly_monitor.db import SQLITE_BUSY_TIMEOUT_SECONDS, postgresql_connect_args
from anomaly_monitor.reading.backends import Backend, ChildBackend, Pending, ThreadBackend
from anomaly_monitor.reading.cancel import is_query_canceled
from anomaly_monitor.reading.query import WindowQuery
from anomaly_monitor.reading.values import BadRow, Window, describe_bad, first_young

if TYPE_CHECKING:
    import pyarrow as pa

#: After a failed Arrow read, use the plain path for this long before trying again,
#: so that a table the driver cannot type (or a database outage) is not read twice
#: every batch.
RETRY_AFTER_SECONDS = 300.0

#: A page read ahead is used only this soon after its read started (a catch-up uses
#: it within milliseconds; one left over from an earlier poll is read again).
READ_AHEAD_MAX_AGE_SECONDS = 5.0
#: Compiled query shapes kept per reader.
MAX_COMPILED = 64

log = logging.getLogger(__name__)


class ArrowUnavailableError(RuntimeError):
    """The Arrow path cannot serve this read; the caller uses the plain path."""


def _sqlite_target(url: URL) -> str | None:
    if url.database in (None, "", ":memory:") or url.database.startswith("file:"):
        return None  # an in-memory database is private to its own connection
    return url.database


def _postgresql_target(engine: sa.Engine) -> str | None:
    """A libpq connection string with the same parameters as the engine's connections
    (the URL's, then this package's timeouts on top), libpq's keywords only; ``None``
    when it cannot be built (the plain path is used)."""
    try:
        from psycopg import pq
        from psycopg.conninfo import make_conninfo

        _, params = engine.dialect.create_connect_args(engine.url)
        params = {**params, **postgresql_connect_args(engine.url)}
        known = {option.keyword.decode() for option in pq.Conninfo.get_defaults()}
        return make_conninfo("", **{k: v for k, v in params.items()
                                    if k in known and v is not None})
    except Exception as exc:  # e.g. a URL parameter libpq does not understand
        log.info("Arrow reads are off for this database: %s", type(exc).__name__)
        return None


class ArrowReader:
    """Reads keyset pages of the source table as Arrow through ADBC, one page ahead.

    ``read`` runs a window query and returns its :class:`ArrowPage`, or ``None``
    when the plain path must read it; after a failure the reader stands aside for
    ``RETRY_AFTER_SECONDS``. ``read_ahead`` starts the next page's read so that it
    runs while the current page is scored; a different next request discards it.
    Not thread-safe: use one per monitor.
    """

    def __init__(self, engine: sa.Engine, *, clock: Any = time.monotonic) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._clock = clock
        self._backend: Backend | None = None
        self._resume_at = 0.0
        self._compiled: dict[Hashable, SQLCompiler] = {}
        self._ahead: tuple[str, Pending, float] | None = None
        self._cancelled = False
        #: Reads served by the Arrow path, and how many of them had been read ahead.
        self.fetches = 0
        self.read_ahead_hits = 0
        #: Seconds between the start of the last page's read and its use.
        self.page_age_seconds = 0.0
        #: When a query was last submitted (``clock``): :meth:`idle_for`.
        self._used_at = clock()
        backend = engine.url.get_backend_name()
        self._target = (_sqlite_target(engine.url) if backend == "sqlite"
                        else _postgresql_target(engine) if backend == "postgresql" else None)

    @property
    def usable(self) -> bool:
        """Whether the next :meth:`read` will try the Arrow path."""
        return self._target is not None and self._clock() >= self._resume_at

    def _open(self) -> Backend:
        if self._backend is None:
            target = self._target
            assert target is not None
            driver = ("adbc_driver_sqlite" if self.dialect.name == "sqlite"
                      else "adbc_driver_postgresql")
            if importlib.util.find_spec(driver) is None or \
                    importlib.util.find_spec("pyarrow") is None:
                self._target = None
                raise ArrowUnavailableError(f"{driver} or pyarrow is not installed")
            self._backend = (
                ChildBackend(target, SQLITE_BUSY_TIMEOUT_SECONDS * 1000)
                if self.dialect.name == "sqlite" else ThreadBackend(target))
        return self._backend

    def _sql(self, query: WindowQuery, after_id: int) -> str:
        compiled = self._compiled.get(query.key)
        if compiled is None:
            if len(self._compiled) >= MAX_COMPILED:
                self._compiled.clear()
            compiled = self._compiled[query.key] = query.compile(self.dialect)
        return WindowQuery.sql(compiled, after_id)

    def _take(self, sql: str, batch_rows: int) -> pa.Table:
        """The page for ``sql``: the one read ahead if it matches and is recent, else
        one read now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead_sql, pending, started = ahead
            age = self._clock() - started
            if ahead_sql == sql and age <= READ_AHEAD_MAX_AGE_SECONDS:
                table = pending.result()
                self.read_ahead_hits += 1
                self.page_age_seconds = self._clock() - started
                return table
            with contextlib.suppress(Exception):  # not wanted; only wait for it
                pending.result()
        self.page_age_seconds = 0.0
        self._used_at = self._clock()
        return self._open().submit(sql, batch_rows).result()

    def read(self, query: WindowQuery, after_id: int) -> ArrowPage | None:
        """The page of ``query`` after ``after_id``, or ``None`` when the plain path
        must read it (the reader is standing aside, or this read failed: it then
        stands aside). A page read ahead for the same query is used if it is at most
        ``READ_AHEAD_MAX_AGE_SECONDS`` old (its ``age_seconds`` says how old)."""
        if not self.usable:
            return None
        try:
            table = self._take(self._sql(query, after_id), query.limit)
            self.fetches += 1
            return ArrowPage.from_table(
                table, query.features, with_xmin=query.hold_back,
                numeric_text=self.dialect.name == "postgresql",
                numeric_timestamps=query.source.epoch_timestamps,
                age_seconds=self.page_age_seconds,
                timestamp_unit=query.source.timestamp_unit)
        except ArrowUnavailableError:
            return None
        except Exception as exc:  # a lost connection, a column Arrow cannot convert
            if is_query_canceled(exc) or self._cancelled:  # a plain read would be too
                raise
            self.stand_aside(exc)
            return None

    def read_ahead(self, query: WindowQuery, after_id: int) -> None:
        """Start reading the page of ``query`` after ``after_id`` now, for a
        :meth:`read` soon: the caller found the last page full, so that the next one
        is read while this one is scored."""
        if not self.usable or self._ahead is not None:
            return
        try:
            sql = self._sql(query, after_id)
            self._ahead = (sql, self._open().submit(sql, query.limit), self._clock())
            self._used_at = self._ahead[2]
        except ArrowUnavailableError:
            return
        except Exception as exc:
            self.stand_aside(exc)

    def idle_for(self) -> float:
        """Seconds since this reader last submitted a query."""
        return self._clock() - self._used_at

    def stand_aside(self, exc: BaseException) -> None:
        """Log ``exc`` and use the plain path for ``RETRY_AFTER_SECONDS``."""
        log.info("Arrow read failed (%s: %s); using the plain reader for %.0f s",
                 type(exc).__name__, self._redacted(str(exc).splitlines()[0] if str(exc)
                                                    else ""), RETRY_AFTER_SECONDS)
        self._resume_at = self._clock() + RETRY_AFTER_SECONDS
        self.close()

    def _redacted(self, message: str) -> str:
        password = self.engine.url.password
        return message.replace(str(password), "***") if password else message

    def cancel(self) -> None:
        """Cancel the query running for this reader, if any (from another thread)."""
        self._cancelled = True  # for good: a worker cancels its reads only to stop
        backend = self._backend
        if backend is not None:
            backend.cancel()

    def close(self) -> None:
        """Close the ADBC connection or reader process (reopened on the next use)."""
        backend, self._backend = self._backend, None
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(Exception):
                ahead[1].result()  # the SQLite reader answers in order: take the reply
        if backend is not None:
            try:
                backend.close()
            except Exception as exc:  # a broken connection may refuse to close cleanly
                log.debug("closing the Arrow backend: %s", type(exc).__name__)


class ArrowValues(Sequence[Any]):
    """A read-only sequence over an Arrow array that converts an item only when asked
    (timestamps are parsed for flagged rows, not for every row)."""

    def __init__(self, array: pa.Array | pa.ChunkedArray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.array[index].to_pylist()
        if index < 0:
            index += len(self.array)
        return self.array[index].as_py()


def _primitive(column: pa.ChunkedArray) -> npt.NDArray[Any] | None:
    """A NULL-free integer or floating column as numpy, straight from its buffers;
    ``None`` for other columns. (``to_numpy`` would import pandas: a fifth of a second.)"""
    import pyarrow as pa

    kind = column.type
    if column.null_count or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return None
    code = ("f" if pa.types.is_floating(kind)
            else "i" if pa.types.is_signed_integer(kind) else "u")
    dtype = np.dtype(f"{code}{kind.bit_width // 8}")
    parts = [np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk),
                           offset=chunk.offset * dtype.itemsize)
             for chunk in column.chunks]
    if not parts:
        return np.empty(0, dtype=dtype)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _storage(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``column`` without an extension type (PostgreSQL's NUMERIC arrives as an opaque
    extension over its exact text)."""
    import pyarrow as pa

    if isinstance(column.type, pa.BaseExtensionType):
        return pa.chunked_array([chunk.storage for chunk in column.chunks],
                                type=column.type.storage_type)
    return column


def _check_numeric(kind: pa.DataType, numeric_text: bool, what: str) -> None:
    import pyarrow as pa

    types = pa.types
    if not (types.is_integer(kind) or types.is_floating(kind) or types.is_boolean(kind)
            or types.is_decimal(kind) or types.is_null(kind)
            or (numeric_text and (types.is_string(kind) or types.is_large_string(kind)))):
        raise pa.ArrowInvalid(f"{what} came back as {kind}: read by the plain path")


def _floats(column: pa.ChunkedArray) -> npt.NDArray[np.float64]:
    """A numeric column as float64, NULL as NaN (decimals and numeric text through
    Arrow's compute kernels)."""
    import pyarrow as pa

    plain = _primitive(column)
    if plain is None:
        import pyarrow.compute as pc

        if not pa.types.is_floating(column.type):  # decimals, numeric text, NULLs
            return np.asarray(pc.cast(column, pa.float64(), safe=False).to_numpy(),
                              dtype=np.float64)
        plain = pc.fill_null(column, float("nan")).to_numpy()
    if plain.dtype == np.float32:
        # The plain drivers give a REAL as the double of its shortest decimal form
        # (0.1, not 0.100000001490116); so do the same here.
        return plain.astype(str).astype(np.float64)
    return plain.astype(np.float64, copy=False)


def _integers(column: pa.ChunkedArray) -> npt.NDArray[np.int64]:
    plain = _primitive(column)
    return (plain if plain is not None else column.to_numpy()).astype(np.int64, copy=False)


def _datetime64(moment: dt.datetime) -> np.datetime64:
    return np.datetime64(moment.astimezone(dt.UTC).replace(tzinfo=None), "us")


@dataclass
class ArrowPage:
    """A page read as Arrow, as numpy: ids, feature values (NaN where NULL) with their
    NULL mask, the timestamps left in Arrow, and on PostgreSQL each row's ``xmin`` and
    the snapshot's horizon; ``age_seconds``: how long before its use its read began."""

    ids: npt.NDArray[np.int64]
    timestamps: pa.ChunkedArray
    values: npt.NDArray[np.float64]
    nulls: npt.NDArray[np.bool_]
    xmins: npt.NDArray[np.int64] | None
    features: tuple[str, ...]
    horizon: int | None = None
    age_seconds: float = 0.0
    timestamp_unit: str = "auto"

    @classmethod
    def from_table(cls, table: pa.Table, features: tuple[str, ...], *, with_xmin: bool,
                   numeric_text: bool, numeric_timestamps: bool,
                   age_seconds: float = 0.0, timestamp_unit: str = "auto") -> ArrowPage:
        """Columns: id, timestamp, the features, then ``xmin`` and the horizon when
        ``with_xmin``. Raises ``pyarrow.ArrowInvalid`` for a column the plain path must
        read: a feature that is not a number, a boolean or a decimal (text only with
        ``numeric_text``: PostgreSQL's exact NUMERIC text, whereas SQLite renders the
        REALs of a column that also holds text or BLOBs with 7 digits), or, with
        ``numeric_timestamps`` (an epoch column), timestamps that came back as text."""
        n_features = len(features)
        columns = [_storage(table.column(i)) for i in range(2 + n_features)]
        for j in range(n_features):
            _check_numeric(columns[2 + j].type, numeric_text, f"feature column {j}")
        if numeric_timestamps:
            _check_numeric(columns[1].type, numeric_text, "the timestamp column")
        n = table.num_rows
        values = np.empty((n, n_features), dtype=np.float64)
        nulls = np.zeros((n, n_features), dtype=bool)
        for j in range(n_features):
            column = columns[2 + j]
            values[:, j] = _floats(column)
            if column.null_count:
                nulls[:, j] = column.is_null().to_numpy()
        xmins = _integers(table.column(2 + n_features)) if with_xmin else None
        horizon = (int(table.column(3 + n_features)[0].as_py())
                   if with_xmin and n else None)
        return cls(_integers(table.column(0)), columns[1], values, nulls, xmins, features,
                   horizon, age_seconds, timestamp_unit)

    def first_young(self, ready_before: dt.datetime, stop: int,
                    future_from: dt.datetime | None = None) -> int:
        """The index of the first row whose timestamp is not older than
        ``ready_before`` and not at or after ``future_from`` (vectorised for an Arrow
        timestamp type; other timestamps are parsed, and only among the first ``stop``
        rows)."""
        import pyarrow as pa

        kind = self.timestamps.type
        if not pa.types.is_timestamp(kind):
            return first_young(ArrowValues(self.timestamps), ready_before, stop, future_from,
                               self.timestamp_unit)
        # A naive timestamp column holds UTC wall time, as the plain path assumes.
        stamps = self.timestamps.cast(pa.timestamp("us", kind.tz)).to_numpy()
        young = stamps >= _datetime64(ready_before)  # NaT (NULL) is never young
        if future_from is not None:
            young &= stamps < _datetime64(future_from)
        young = np.flatnonzero(young)
        return int(young[0]) if young.size else len(self.ids)

    def window(self, stop: int) -> Window:
        """The first ``stop`` rows as a :class:`Window`: NULL, NaN and infinite values
        are quarantined as on the plain path."""
        ids, values, nulls = self.ids[:stop], self.values[:stop], self.nulls[:stop]
        suspects = np.flatnonzero(~np.isfinite(values).all(axis=1) | nulls.any(axis=1))
        raw = [[None if null else value for value, null in zip(values[i], nulls[i],
                                                                strict=True)]
               for i in suspects]
        bad_index, reasons = describe_bad(raw, self.features, range(len(raw)), values[suspects])
        keep = np.ones(len(ids), dtype=bool)
        keep[suspects[bad_index]] = False
        bad = [BadRow(int(ids[suspects[k]]), *reasons[n]) for n, k in enumerate(bad_index)]
        stamps = self.timestamps.slice(0, stop)
        if not keep.all():
            stamps = stamps.filter(keep)
        return Window(ids[keep], ArrowValues(stamps), values[keep], bad, None,
                      int(ids[-1]) if len(ids) else None, timestamp_unit=self.timestamp_unit)
