"""Values read from the watched table: scorable rows as a float matrix, the others
quarantined with a reason (:class:`BadRow`), timestamps parsed on demand.

Both readers (plain and Arrow) end in a :class:`Window`; the rules for what cannot
be scored (NULL, NaN, infinite, non-numeric) are here once.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt

from anomaly_monitor.config import TIMESTAMP_UNITS
from anomaly_monitor.tables import as_utc

#: Quarantine reasons (the ``reason`` label of ``rows_quarantined_total``).
REASONS = ("null", "nan", "infinite", "non_numeric", "read_timeout")


#: A row stamped more than this far ahead of the clock is mis-stamped: a batch with
#: ``query_delay_seconds`` scores it at once instead of waiting for it (and counts it),
#: and it does not move the incidents' horizon (``anomaly_monitor.incidents``).
FUTURE_TOLERANCE_SECONDS = 3600.0


def future_from(now: dt.datetime) -> dt.datetime:
    """From when a row's stamp is too far ahead of ``now`` to be taken at its word."""
    return now + dt.timedelta(seconds=FUTURE_TOLERANCE_SECONDS)


#: ``auto``: an epoch number below this (absolute) is seconds (years to 5138), below
#: 1000 times it milliseconds, then microseconds, then nanoseconds.
AUTO_SECONDS_BELOW = 1e11


def epoch_unit(number: float) -> str:
    """The unit an epoch ``number`` is read in by ``auto``: by its size."""
    size = abs(number)
    for unit, limit in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if size < AUTO_SECONDS_BELOW * limit:
            return unit
    return "ns"


def to_timestamp(value: Any, unit: str = "auto") -> dt.datetime | None:
    """A source timestamp (datetime, date, ISO text, or an epoch number in ``unit``:
    ``s``, ``ms``, ``us``, ``ns``, or ``auto`` by its size) as aware UTC; ``None`` when
    it is none of these."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return as_utc(value)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            scale = TIMESTAMP_UNITS[epoch_unit(number) if unit == "auto" else unit]
            try:
                return dt.datetime.fromtimestamp(number / scale, dt.UTC)
            except (OverflowError, OSError, ValueError):
                return None
        return None
    if isinstance(value, str):
        try:
            return as_utc(dt.datetime.fromisoformat(value))
        except ValueError:
            pass
        try:  # numeric text (e.g. a NUMERIC epoch column read as text)
            return to_timestamp(float(value), unit)
        except ValueError:
            return None
    return None


def classify(value: Any) -> tuple[str, str] | None:
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
    #: Rows stamped too far in the future to be waited for (see ``count_from``).
    future_rows: int = 0
    #: How epoch-number timestamps are read (``TIMESTAMP_UNITS`` or ``auto``).
    timestamp_unit: str = "auto"

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
        return to_timestamp(self.raw_timestamps[index], self.timestamp_unit)

    def newest_timestamp(self) -> dt.datetime | None:
        """The timestamp of the scorable row with the highest id."""
        return self.timestamp(len(self.raw_timestamps) - 1) if self.raw_timestamps else None

    def span(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        """The timestamps of the first and last scorable rows (by id)."""
        return (self.timestamp(0), self.newest_timestamp()) if self.raw_timestamps \
            else (None, None)

    def count_from(self, moment: dt.datetime) -> tuple[int, int | None]:
        """How many scorable rows are stamped at or after ``moment``, and the first's id."""
        found = [i for i in range(len(self.raw_timestamps))
                 if (stamp := self.timestamp(i)) is not None and stamp >= moment]
        return len(found), (int(self.ids[found[0]]) if found else None)

    @property
    def size(self) -> int:
        """Rows read, scorable and quarantined."""
        return len(self.ids) + len(self.bad)


def describe_bad(
    rows: Sequence[Sequence[Any]], names: Sequence[str], suspects: Sequence[int],
    matrix: npt.NDArray[np.float64],
) -> tuple[list[int], list[tuple[str, str, dict[str, Any]]]]:
    """Which ``suspects`` cannot be scored, and why; a suspect that turns out to hold
    numbers after all gets them written into ``matrix``."""
    bad, reasons = [], []
    for i in suspects:
        problems = [(name, classify(v)) for name, v in zip(names, rows[i], strict=True)]
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


def to_matrix(
    rows: Sequence[Sequence[Any]], names: Sequence[str]
) -> tuple[npt.NDArray[np.float64], list[int], list[tuple[str, str, dict[str, Any]]]]:
    """Convert raw feature tuples; returns the matrix, bad row indices and their reasons."""
    try:
        matrix = np.array(rows, dtype=np.float64).reshape(len(rows), len(names))
        suspects = np.flatnonzero(~np.isfinite(matrix).all(axis=1)).tolist()
    except (TypeError, ValueError):
        matrix = np.full((len(rows), len(names)), np.nan)
        suspects = list(range(len(rows)))
    return matrix, *describe_bad(rows, names, suspects, matrix)


def rows_to_window(
    rows: Sequence[Sequence[Any]], features: Sequence[str], with_label: bool,
    timestamp_unit: str = "auto",
) -> Window:
    """A window of driver rows ``(id, timestamp[, label], *features)``, in id order."""
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    first = 3 if with_label else 2
    matrix, bad_index, reasons = to_matrix([tuple(r[first:]) for r in rows], features)
    keep = np.ones(len(rows), dtype=bool)
    keep[bad_index] = False
    labels = None
    if with_label:
        labels = np.array([float(r[2]) if classify(r[2]) is None else np.nan for r in rows])
        labels = labels[keep]
    bad = [BadRow(int(ids[i]), *reasons[k]) for k, i in enumerate(bad_index)]
    stamps = [r[1] for r, k in zip(rows, keep, strict=True) if k]
    return Window(ids[keep], stamps, matrix[keep], bad, labels,
                  int(ids[-1]) if len(ids) else None, timestamp_unit=timestamp_unit)


def first_young(stamps: Sequence[Any], ready_before: dt.datetime, stop: int,
                future_from: dt.datetime | None = None, unit: str = "auto") -> int:
    """The index of the first of ``stamps[:stop]`` not older than ``ready_before``
    (``len(stamps)`` when there is none). Unreadable timestamps are never young, nor
    are those at or after ``future_from`` (mis-stamped: waiting for them would stop
    the monitor until then)."""
    for i in range(min(stop, len(stamps))):
        stamp = to_timestamp(stamps[i], unit)
        if stamp is not None and stamp >= ready_before and (
                future_from is None or stamp < future_from):
            return i
    return len(stamps)
