"""The plain read path: the window query through SQLAlchemy, one Python tuple per row."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.reading.query import WindowQuery
from anomaly_monitor.reading.values import Window, first_young, rows_to_window


@dataclass
class PlainPage:
    """The rows of one window query, as the driver returned them."""

    rows: Sequence[Sequence[Any]]
    features: tuple[str, ...]
    ids: npt.NDArray[np.int64]
    xmins: npt.NDArray[np.int64] | None = None
    horizon: int | None = None
    age_seconds: float = 0.0
    timestamp_unit: str = "auto"

    @classmethod
    def read(cls, connection: sa.Connection, query: WindowQuery, after_id: int) -> PlainPage:
        """Run ``query`` for the rows after ``after_id`` on ``connection``."""
        rows = connection.execute(query.statement, query.params(after_id)).all()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        unit = query.source.timestamp_unit
        if not query.hold_back:
            return cls(rows, query.features, ids, timestamp_unit=unit)
        xmins = np.array([r[-2] for r in rows], dtype=np.int64)
        horizon = int(rows[0][-1]) if rows else None
        return cls([r[:-2] for r in rows], query.features, ids, xmins, horizon,
                   timestamp_unit=unit)

    def first_young(self, ready_before: dt.datetime, stop: int,
                    future_from: dt.datetime | None = None) -> int:
        """The index of the first of the first ``stop`` rows not older than
        ``ready_before`` and not stamped at or after ``future_from`` (the number of rows
        when there is none)."""
        stamps = [r[1] for r in self.rows[:stop]]
        found = first_young(stamps, ready_before, stop, future_from, self.timestamp_unit)
        return found if found < len(stamps) else len(self.rows)

    def window(self, stop: int) -> Window:
        """The first ``stop`` rows as a :class:`Window` (unscorable rows quarantined)."""
        return rows_to_window(self.rows[:stop], self.features, False, self.timestamp_unit)
