"""Rows written below a monitor's cursor: counted, reported, and scored on request.

The worker reads after its cursor, and below it only the gaps of its own batches
(late commits). A row inserted below it later (a backfill with old ids, negative
ids) is never scored on its own. So every ``BELOW_CHECK_SECONDS``, right after a
sweep of every open gap, the worker counts the rows at or below the cursor
(:func:`measure_below`). That count minus the rows the cursor's generation consumed
is the rows that lay below its start, plus those written below it since, less those
deleted; the lowest value seen is its floor, and how far the count is above that
floor is ``rows_below``: at least that many rows were written below the cursor and
not scored (deleting old rows lowers the figure, so it is a lower bound). It is
shown by ``status`` and ``anomaly_monitor_rows_below_cursor``.

:func:`backfill` scores an id range at or below the cursor exactly once: it skips
the ids that a batch of the current generation read (its range less its gaps) and
those in gaps still open (the sweep's), under the cursor row's lock, so that two
backfills, or a backfill and the worker, never score a row twice. A row quarantined
as ``read_timeout`` (its values never read) is read again, and leaves quarantine
when it can be read now.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from anomaly_monitor.batch import BatchResult, _batch_row, _result, _write_rows
from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.cursors import fence, read_cursor
from anomaly_monitor.entities import stream_context
from anomaly_monitor.incidents import incident_gap
from anomaly_monitor.reading.cancel import bounded
from anomaly_monitor.reading.values import Window
from anomaly_monitor.registry import ModelCache
from anomaly_monitor.scoring import check_features, gap_ranges, score_window
from anomaly_monitor.source import SourceTable, read_gaps
from anomaly_monitor.tables import batches, cursors, quarantine, utcnow

#: How often a worker counts the rows at or below each cursor (seconds).
BELOW_CHECK_SECONDS = 300.0
#: PostgreSQL: the count gives up after this long (it is tried again at the next check).
BELOW_COUNT_TIMEOUT_MS = 10_000


class BackfillError(ValueError):
    """A backfill that cannot run (no model, a range above the cursor, a paused monitor)."""


def measure_below(connection: sa.Connection, source: SourceTable, monitor: str,
                  now: dt.datetime) -> int | None:
    """Count the rows at or below the cursor and record ``rows_below`` (see the module
    docstring); ``None`` when there is no cursor or the count timed out."""
    row = connection.execute(
        sa.select(cursors.c.position, cursors.c.generation, cursors.c.rows_consumed,
                  cursors.c.below_floor).where(cursors.c.monitor == monitor)).first()
    if row is None:
        return None
    count = bounded(connection, BELOW_COUNT_TIMEOUT_MS, lambda: int(connection.execute(
        sa.select(sa.func.count()).select_from(source.table)
        .where(source.id_column <= row.position)).scalar()))
    if count is None:
        return None
    level = count - int(row.rows_consumed)
    floor = level if row.below_floor is None else min(int(row.below_floor), level)
    # Recorded only if no batch moved the cursor or counted rows meanwhile.
    recorded = connection.execute(cursors.update().where(
        cursors.c.monitor == monitor, cursors.c.position == row.position,
        cursors.c.generation == row.generation,
        cursors.c.rows_consumed == row.rows_consumed,
    ).values(below_floor=floor, rows_below=level - floor, below_checked_at=now)).rowcount
    return level - floor if recorded == 1 else None


def _covered(connection: sa.Connection, monitor: str, generation: int, lo: int,
             hi: int) -> list[tuple[int, int]]:
    """Inclusive id ranges within ``lo..hi`` that this generation's batches read, or
    that lie in gaps still open in any generation (the sweep reads those)."""
    spans: list[tuple[int, int]] = []
    # A window's gaps start right after the cursor it read from, below its first_id:
    # every batch ending at or above lo is looked at.
    for first, last, gaps, open_gaps, batch_generation in connection.execute(
            sa.select(batches.c.first_id, batches.c.last_id, batches.c.gaps,
                      batches.c.open_gaps, batches.c.generation)
            .where(batches.c.monitor == monitor, batches.c.last_id >= lo,
                   sa.or_(batches.c.first_id <= hi, batches.c.open_gaps.is_not(None)))):
        # The sweep reads the open gaps of every generation: those are its rows.
        spans += [(int(a), int(b)) for a, b in (open_gaps or [])]
        if batch_generation != generation or int(first) > hi:
            continue
        holes = [(int(a), int(b)) for a, b in (gaps or [])]
        start = min([int(first), *(a for a, _ in holes)])
        spans += [(a, b) for a, b in _uncovered(start, int(last), holes)]
    spans = [(max(a, lo), min(b, hi)) for a, b in spans if a <= hi and b >= lo]
    # Rows quarantined because they could not be read in time are read again.
    retry = [(i, i) for i in _timed_out(connection, monitor, generation, lo, hi)]
    left = [(a, b) for a, b in _uncovered(lo, hi, spans)]
    return [(a, b) for a, b in _uncovered(lo, hi, left + retry)]


def _timed_out(connection: sa.Connection, monitor: str, generation: int, lo: int,
               hi: int) -> list[int]:
    """Ids in ``lo..hi`` quarantined as ``read_timeout`` (their values were never read)."""
    return [int(i) for i in connection.execute(
        sa.select(quarantine.c.source_id).where(
            quarantine.c.monitor == monitor, quarantine.c.generation == generation,
            quarantine.c.reason == "read_timeout",
            quarantine.c.source_id.between(lo, hi))).scalars()]


def _uncovered(lo: int, hi: int, covered: Sequence[tuple[int, int]]) -> list[list[int]]:
    """``lo..hi`` less the ``covered`` ranges, as inclusive ranges."""
    left, at = [], lo
    for a, b in sorted(covered):
        if a > at:
            left.append([at, a - 1])
        at = max(at, b + 1)
    if at <= hi:
        left.append([at, hi])
    return left


def _credited(rows: int) -> dict[str, sa.ColumnElement[int] | None]:
    """The cursor's counts after a backfill scored ``rows`` rows never counted before.
    They are taken to be the rows counted below the cursor first (that is what a
    backfill is for), then rows from before the start: the floor drops by the rest, so
    that the next count agrees, and status shows the change at once."""
    below = sa.func.coalesce(cursors.c.rows_below, 0)
    rest = sa.case((below >= rows, 0), else_=rows - below)
    return {
        "rows_consumed": cursors.c.rows_consumed + rows,
        "rows_below": sa.case((cursors.c.rows_below.is_(None), None),
                              (below > rows, below - rows), else_=0),
        "below_floor": sa.case((cursors.c.below_floor.is_(None), None),
                               else_=cursors.c.below_floor - rest),
    }


def _chunk_end(connection: sa.Connection, source: SourceTable, lo: int, hi: int,
               rows: int) -> int:
    """The id at which ``rows`` rows from ``lo`` are reached (``hi`` if sooner)."""
    value = connection.execute(
        sa.select(source.id_column).where(source.id_column.between(lo, hi))
        .order_by(source.id_column).offset(rows - 1).limit(1)).scalar()
    return hi if value is None else int(value)


def _drop(window: Window, ids: set[int]) -> Window:
    """``window`` without the rows whose ids are in ``ids``."""
    keep = np.array([int(i) not in ids for i in window.ids], dtype=bool)
    return dataclasses.replace(
        window, ids=window.ids[keep], values=window.values[keep],
        raw_timestamps=[t for t, k in zip(window.raw_timestamps, keep, strict=True) if k],
        labels=None if window.labels is None else window.labels[keep],
        bad=[b for b in window.bad if b.source_id not in ids])


def _backfill_chunk(engine: sa.Engine, monitor: MonitorSettings, source: SourceTable,
                    models: ModelCache, generation: int, position: int, lo: int,
                    hi: int, clock: Callable[[], dt.datetime]) -> BatchResult | None:
    """Score the rows in ``lo..hi`` no batch read; ``None`` when there were none."""
    t0 = time.perf_counter()
    started = clock()
    with engine.connect() as connection:
        version = models.active_version(connection, monitor.name)
        if version is None:
            raise BackfillError(f"monitor {monitor.name!r} has no active model; run: "
                                f"anomaly-monitor train {monitor.name}")
        check_features(monitor, version)
        ranges = _uncovered(lo, hi, _covered(connection, monitor.name, generation, lo, hi))
        window = read_gaps(connection, source, [ranges], position, features=version.features)
        model = models.model(connection, version) if window.size else None
        # Rows below the cursor: each with the window it had, entities' states unmoved.
        stream = (stream_context(connection, source, model, window, late=True)
                  if model is not None else None)
    if model is None:
        return None
    flagged, severities = score_window(monitor.name, model, window, started, stream)
    with engine.begin() as connection:
        # The cursor row's lock first: a concurrent backfill's rows are then seen here.
        fence(connection, monitor.name, None, clock(), generation=generation)
        covered = _covered(connection, monitor.name, generation, lo, hi)
        found = [*window.ids.tolist(), *(b.source_id for b in window.bad)]
        again = {i for i in found if any(a <= i <= b for a, b in covered)}
        if again:  # scored meanwhile (another backfill, or the sweep): not twice
            keep = [f["source_id"] not in again for f in flagged]
            window = _drop(window, again)
            flagged = [f for f, k in zip(flagged, keep, strict=True) if k]
            severities = severities[np.array(keep, dtype=bool)]
        if window.size == 0:
            return None
        result = _result(monitor, model, window, flagged, severities, caught_up=True)
        kept = [*window.ids.tolist(), *(b.source_id for b in window.bad)]
        batch = _batch_row(result, started, "backfill",
                           gap_ranges(kept, result.first_id - 1, result.last_id), t0)
        retried = set(_timed_out(connection, monitor.name, generation, lo, hi)) & set(kept)
        if retried:  # read at last: no longer quarantined (and counted already)
            connection.execute(quarantine.delete().where(
                quarantine.c.monitor == monitor.name, quarantine.c.generation == generation,
                quarantine.c.reason == "read_timeout", quarantine.c.source_id.in_(retried)))
        written = _write_rows(connection, monitor, generation, window, flagged, clock(),
                              incident_gap(monitor, version))
        connection.execute(batches.insert().values(**batch, generation=generation))
        connection.execute(cursors.update().where(cursors.c.monitor == monitor.name)
                           .values(**_credited(result.rows - len(retried))))
    return dataclasses.replace(written.applied(result),
                               duration_seconds=time.perf_counter() - t0,
                               generation=generation, version=version)


@dataclass(frozen=True)
class Backfill:
    """What :func:`backfill` did: its batches, the ids it covered (``to_id`` is at most
    the cursor) and how many rows that range holds."""

    batches: list[BatchResult]
    from_id: int
    to_id: int
    rows_in_range: int

    @property
    def rows(self) -> int:
        """Rows scored or quarantined."""
        return sum(b.rows for b in self.batches)

    @property
    def skipped(self) -> int:
        """Rows of the range left alone: read by a batch already, or the sweep's."""
        return max(0, self.rows_in_range - self.rows)


def backfill(
    engine: sa.Engine, monitor: MonitorSettings, source: SourceTable, models: ModelCache,
    from_id: int, to_id: int, *, clock: Callable[[], dt.datetime] = utcnow,
) -> Backfill:
    """Score the rows with ids ``from_id..to_id`` at or below the cursor that no batch
    of its generation read, in batches of ``monitor.batch_size`` rows (each committed
    with a ``backfill`` record); rows above the cursor are left to the worker. Raises
    :class:`BackfillError` when there is nothing it may score."""
    with engine.connect() as connection:
        cursor = read_cursor(connection, monitor.name)
    if cursor is None:
        raise BackfillError(f"monitor {monitor.name!r} has no cursor yet (no model was "
                            f"ever activated); run: anomaly-monitor train {monitor.name}")
    if cursor.paused:
        raise BackfillError(f"monitor {monitor.name!r} is paused ({cursor.pause_reason}); "
                            "fix that first")
    if from_id > cursor.position:
        raise BackfillError(f"ids from {from_id} are above the cursor ({cursor.position}): "
                            "the worker scores those")
    hi_all = min(to_id, cursor.position)
    with engine.connect() as connection:
        in_range = int(connection.execute(sa.select(sa.func.count()).select_from(source.table)
                                          .where(source.id_column.between(from_id, hi_all)))
                       .scalar())
    results, lo = [], from_id
    while lo <= hi_all:
        with engine.connect() as connection:
            hi = _chunk_end(connection, source, lo, hi_all, monitor.batch_size)
        result = _backfill_chunk(engine, monitor, source, models, cursor.generation,
                                 cursor.position, lo, hi, clock)
        if result is not None:
            results.append(result)
        lo = hi + 1
    return Backfill(results, from_id, hi_all, in_range)
