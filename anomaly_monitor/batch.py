"""The batch step, ``run_batch``: read the rows after a monitor's cursor, score them,
commit the result; and the late-row sweep.

A batch reads its window outside any write transaction, scores it, then in ONE
transaction advances the cursor with a compare-and-set on its old position and
inserts the flagged rows, the quarantined rows and the batch record. If another
writer moved the cursor meanwhile, the compare-and-set matches nothing and the
whole batch rolls back (:class:`BatchConflictError`); the unique (monitor, generation,
source_id) keys are the second guard. A crash anywhere leaves all of the batch or none. The
sweep (:func:`sweep_late_rows`) ends in the same commit path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.cursors import CursorState, Lease, fence, read_cursor
from anomaly_monitor.db import is_postgresql
from anomaly_monitor.drift import DriftReport
from anomaly_monitor.entities import state_writer, stream_context
from anomaly_monitor.incidents import incident_gap, record_incidents
from anomaly_monitor.observe import Observation, Watch, watch_batch
from anomaly_monitor.reading.arrow import ArrowReader
from anomaly_monitor.reading.cancel import (
    is_query_canceled,
    ran_into_timeout,
    statement_timeout_seconds,
)
from anomaly_monitor.reading.values import (
    FUTURE_TOLERANCE_SECONDS,
    BadRow,
    Window,
)
from anomaly_monitor.reading.values import (
    future_from as _future_from,
)
from anomaly_monitor.reading.windows import read_window
from anomaly_monitor.registry import LoadedModel, ModelCache, ModelVersion
from anomaly_monitor.scoring import (
    StreamContext,
    check_features,
    flag_rows,
    gap_ranges,
    score_rows,
    score_window,
    subtract_ids,
)
from anomaly_monitor.shadow import ShadowScore
from anomaly_monitor.source import (
    SlowReadError,
    SourceTable,
    check_position,
    next_id,
    read_gaps,
    timestamp_at,
)
from anomaly_monitor.suppression import suppress_flags
from anomaly_monitor.tables import anomalies, as_utc, batches, quarantine, utcnow

#: A window ends before its 1001st id gap, so that every gap of every batch is recorded.
MAX_GAP_RANGES = 1000
#: Open gaps are swept for this long after their batch (a transaction open longer than
#: this that commits into a gap is not seen); then they are closed.
GAP_RETENTION_SECONDS = 3600.0
#: A batch's open gaps are read at every sweep while it is younger than this (late
#: commits are almost always young); then at twice this age, four times, ... and a last
#: time at ``GAP_RETENTION_SECONDS``: about 6 reads in its last 59 minutes, not 1 a poll.
EAGER_SWEEP_SECONDS = 60.0
#: Due batches whose gap lists are read per query.
DUE_BATCHES_PER_QUERY = 500
#: A window is read through the Arrow reader when the previous one had this many rows
#: (or was full).
ARROW_MIN_ROWS = 2_000
#: An Arrow reader (an ADBC connection, on SQLite a reader process) unused for this long
#: is closed at the end of a poll; a catch-up opens it again.
ARROW_IDLE_SECONDS = 120.0
#: The warning about such rows is repeated at most this often per monitor.
FUTURE_WARNING_SECONDS = 600.0
#: PostgreSQL: how long an open transaction may hold the read window back before the
#: worker reads past it (the sweep then scores what that transaction commits).
HORIZON_MAX_STALL_SECONDS = 60.0
#: A window read that runs past the statement timeout is retried with this many
#: times fewer rows, down to one row; a row that cannot be read alone is quarantined
#: (``read_timeout``) when its id can be, else the monitor pauses.
TIMEOUT_SHRINK_FACTOR = 10
#: After a timeout, windows grow back (doubling per batch) to half the size that timed
#: out; once this long has passed without one, to the full batch size again.
TIMEOUT_MEMORY_SECONDS = 3600.0

# The late-row and horizon warnings keep the logger name operators filter on.
log = logging.getLogger("anomaly_monitor.scoring")


@dataclass(frozen=True)
class BatchResult:
    """What one call of :func:`run_batch` did.

    ``status`` is ``committed`` (a batch was written), ``idle`` (nothing to
    read), ``slow`` (the read ran past the statement timeout: the next reads fewer
    rows), ``paused`` or ``no_model`` (nothing was read).
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
    #: Rows stamped too far in the future to wait for (scored at once).
    future_rows: int = 0
    #: A window monitor's entities first seen in this batch, and its rows scored 0
    #: because their entity was still learning.
    new_entities: int = 0
    learning_rows: int = 0
    #: Incidents this batch opened (``anomaly_monitor.incidents``), and its flags that
    #: a suppression window marked (counted in ``flagged`` too; their severities are
    #: not in ``severities``).
    incidents_opened: int = 0
    suppressed: int = 0
    #: The drift of the active version's recent rows, and the challenger's result in
    #: shadow on this batch (``None``: no reference, no challenger).
    drift: DriftReport | None = field(default=None, repr=False, compare=False)
    shadow: ShadowScore | None = field(default=None, repr=False, compare=False)
    #: ``idle`` with no row at all after the cursor when it was read (no delay held one
    #: back): the backlog is 0 without counting it.
    nothing_after: bool = False
    #: The cursor after this batch, its generation and the active version it read
    #: (``committed`` and ``idle``), so that the rest of the poll need not read them again.
    position: int | None = field(default=None, compare=False)
    generation: int = field(default=0, compare=False)
    version: ModelVersion | None = field(default=None, repr=False, compare=False)

    @property
    def rows(self) -> int:
        """Rows consumed: scored plus quarantined."""
        return self.scored + self.quarantined


@dataclass
class ReadState:
    """Per-monitor memory of the read path: its Arrow reader (one ADBC connection, open
    while it is used: :meth:`close_idle`) and the open PostgreSQL transaction holding
    the window back."""

    horizon: int | None = None
    since: float = 0.0
    arrow: ArrowReader | None = None
    #: Rows in the last window read (it predicts the size of the next one).
    last_rows: int = 0
    #: Whether windows may be read through Arrow (a one-off batch does not bother).
    use_arrow: bool = True
    #: When rows stamped in the future were last warned about (``time.monotonic``).
    future_warned_at: float | None = None
    #: Rows the last window kept when it ended before a gap it could not record (sparse
    #: ids): the next reads about twice that, not a whole batch it would mostly drop.
    gap_rows: int | None = None
    #: After a read ran past the statement timeout: the rows per window now, the most
    #: it grows back to, and when the last timeout was (``time.monotonic``).
    slow_rows: int | None = None
    slow_ceiling: int = 0
    slow_at: float = 0.0
    #: Set when a stopping worker cancels this monitor's reads.
    cancelled: bool = False
    #: Whether a full window starts the next one's read (off for a poll's last batch
    #: when the reader is closed after the poll: the page would be thrown away).
    read_ahead: bool = True
    #: Whether the monitor has batches with open gaps (``None``: not known yet). Only
    #: its lease holder writes them, so while it knows of none a sweep need not look.
    open_gaps: bool | None = None
    #: The session's statement_timeout in seconds (``None``: none), read when a
    #: cancelled read first needs it (``timeout_known``).
    statement_timeout: float | None = None
    timeout_known: bool = False

    def limit(self, batch_size: int) -> int:
        """How many rows to read for the next window."""
        limit = batch_size
        if self.gap_rows is not None:
            # A power of two: the same few query shapes (the Arrow reader caches each).
            wanted = max(MAX_GAP_RANGES, 2 * self.gap_rows)
            limit = min(batch_size, 1 << (wanted - 1).bit_length())
        return limit if self.slow_rows is None else min(limit, self.slow_rows)

    def timed_out(self, limit: int, now: float) -> int:
        """Record that a window of ``limit`` rows ran past the statement timeout; the
        rows to read next."""
        self.slow_rows = max(1, limit // TIMEOUT_SHRINK_FACTOR)
        self.slow_ceiling, self.slow_at = max(1, limit // 2), now
        return self.slow_rows

    def slow_row_skipped(self) -> None:
        """The one row that timed out was quarantined: it, not the table, was slow, so
        windows go back to their full size (a slow table times out again, and shrinks)."""
        self.slow_rows = None

    def read_in_time(self, now: float) -> None:
        """A window was read within the timeout: let the next one grow."""
        if self.slow_rows is None:
            return
        if now - self.slow_at > TIMEOUT_MEMORY_SECONDS:
            self.slow_rows = None
        else:
            self.slow_rows = min(self.slow_ceiling, 2 * self.slow_rows)

    def cancel(self) -> None:
        """Cancel the Arrow reader's running query (a stopping worker, another thread)."""
        self.cancelled = True
        if self.arrow is not None:
            self.arrow.cancel()

    def plain(self, batch_size: int) -> bool:
        """Whether to read the next window by the plain path: after a small window, for
        a few rows are cheaper to read plainly than through the Arrow reader."""
        return self.last_rows < min(ARROW_MIN_ROWS, batch_size)

    def reader(self, engine: sa.Engine) -> ArrowReader | None:
        """The Arrow reader for ``engine``, created on first use."""
        if not self.use_arrow:
            return None
        if self.arrow is None or self.arrow.engine is not engine:
            self.close()
            self.arrow = ArrowReader(engine)
        return self.arrow

    def close(self) -> None:
        """Close the Arrow reader's connection (a later read opens it again)."""
        if self.arrow is not None:
            self.arrow.close()

    def close_idle(self) -> None:
        """Close the Arrow reader's connection if it went unused for
        ``ARROW_IDLE_SECONDS`` (a monitor that caught up reads its few new rows by the
        plain path)."""
        if self.arrow is not None and self.arrow.idle_for() > ARROW_IDLE_SECONDS:
            self.arrow.close()

    def stalled(self, horizon: int | None, now: float) -> bool:
        """Record the blocking horizon; whether that same one has blocked for too long
        (it then stays "stalled", read past, until the transaction ends)."""
        if horizon is None or horizon != self.horizon:
            self.horizon, self.since = horizon, now
            return False
        return now - self.since > HORIZON_MAX_STALL_SECONDS


@dataclass(frozen=True)
class Written:
    """What a batch's commit wrote beyond its rows: the incidents it opened, and which
    of its flags a suppression window marked."""

    opened: int = 0
    suppressed: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def applied(self, result: BatchResult) -> BatchResult:
        """``result`` counting the suppressed flags apart (and without their severities)."""
        marked = self.suppressed
        kept = result.severities[~marked] if marked.size == len(result.severities) \
            else result.severities
        return dataclasses.replace(result, incidents_opened=self.opened,
                                   suppressed=int(marked.sum()), severities=kept)


def _commit(
    engine: sa.Engine, monitor: MonitorSettings, lease: Lease | None, now: dt.datetime,
    window: Window, flagged: list[dict[str, Any]], batch: dict[str, Any] | None, *,
    generation: int, move: tuple[int, int, dt.datetime | None] | None = None,
    also: Callable[[sa.Connection], None] | None = None, gap_seconds: float | None = None,
) -> Written:
    """The one commit path of a batch: fence the cursor (moving it ``move = (from, to,
    timestamp of the row at to)``), run ``also``, write the flagged and quarantined rows
    under the cursor's ``generation`` (flags inside a suppression window marked), the
    incidents of the others (grouped within ``gap_seconds``; none when ``None``) and
    the ``am_batches`` record (none when ``batch`` is ``None``), in one transaction."""
    with engine.begin() as connection:
        fence(connection, monitor.name, lease, now, *(move or ()), generation=generation,
              rows=batch["rows"] if batch is not None else 0)
        if also is not None:
            also(connection)
        written = Written()
        if batch is not None:
            written = _write_rows(connection, monitor, generation, window, flagged, now,
                                  gap_seconds)
            connection.execute(batches.insert().values(**batch, generation=generation))
        return written


def _write_rows(connection: sa.Connection, monitor: MonitorSettings, generation: int,
                window: Window, flagged: list[dict[str, Any]], now: dt.datetime,
                gap_seconds: float | None) -> Written:
    """Insert the flagged rows (marked when suppressed; the others with their
    incidents) and the quarantined ones."""
    marked = suppress_flags(connection, monitor.name, monitor.suppress, flagged)
    opened = 0
    if gap_seconds is not None and window.size:
        alerting = [f for f, m in zip(flagged, marked, strict=True) if not m]
        for f in flagged:  # every row of one insert has the same keys
            f.setdefault("incident_id", None)
            f.setdefault("label", None)
        opened = record_incidents(connection, monitor.name, generation, alerting,
                                  gap_seconds=gap_seconds, newest=window.newest_timestamp(),
                                  now=now)
    if flagged:
        connection.execute(anomalies.insert(), [{**row, "generation": generation}
                                                for row in flagged])
    if window.bad:
        connection.execute(quarantine.insert(), [
            {"monitor": monitor.name, "source_id": b.source_id, "reason": b.reason,
             "detail": b.detail, "raw_values": b.raw_values, "quarantined_at": now,
             "generation": generation}
            for b in window.bad
        ])
    return Written(opened, marked)


def _result(
    monitor: MonitorSettings, model: LoadedModel, window: Window,
    flagged: list[dict[str, Any]], severities: npt.NDArray[np.float64], caught_up: bool,
) -> BatchResult:
    ids = list(window.ids) + [b.source_id for b in window.bad]
    return BatchResult(
        monitor.name, "committed", scored=len(window.ids), flagged=len(flagged),
        quarantined=len(window.bad), first_id=int(min(ids)), last_id=int(max(ids)),
        model_version=model.version.version, newest_timestamp=window.newest_timestamp(),
        caught_up=caught_up,
        quarantine_reasons=dict(Counter(b.reason for b in window.bad)), severities=severities,
    )


def _stream_counts(stream: StreamContext | None) -> dict[str, int]:
    """A window monitor's new entities and learning rows of a batch."""
    if stream is None:
        return {}
    return {"new_entities": stream.new_entities, "learning_rows": stream.learning}


def _batch_row(result: BatchResult, started: dt.datetime, kind: str,
               gaps: list[list[int]], t0: float) -> dict[str, Any]:
    return {
        "monitor": result.monitor, "first_id": result.first_id, "last_id": result.last_id,
        "rows": result.rows, "flagged": result.flagged, "quarantined": result.quarantined,
        "model_version": result.model_version, "started_at": started,
        "newest_timestamp": result.newest_timestamp, "kind": kind, "gaps": gaps or None,
        # Only a window's gaps can still fill; a late batch's holes were swept already.
        "open_gaps": (gaps or None) if kind == "window" else None,
        "duration_seconds": time.perf_counter() - t0,
    }


def _note_future_rows(monitor: str, window: Window, future_from: dt.datetime,
                      read_state: ReadState) -> None:
    """Count the window's rows stamped at or after ``future_from`` (scored without
    waiting for them); warn, at most every ``FUTURE_WARNING_SECONDS``."""
    count, first = window.count_from(future_from)
    window.future_rows = count
    if not count:
        return
    now = time.monotonic()
    if read_state.future_warned_at is None or \
            now - read_state.future_warned_at >= FUTURE_WARNING_SECONDS:
        read_state.future_warned_at = now
        log.warning("monitor %s: %d row(s) stamped over %.0f s in the future (first id %s) "
                    "are scored now rather than held back by query_delay_seconds; check "
                    "the clock of whatever writes them", monitor, count,
                    FUTURE_TOLERANCE_SECONDS, first)


class WindowTimeoutError(Exception):
    """The window's read ran past the statement timeout."""


@contextlib.contextmanager
def _window_read(connection: sa.Connection, read_state: ReadState) -> Iterator[None]:
    """Turn a statement timeout of the window query into :class:`WindowTimeoutError`;
    other queries' timeouts, and a query cancelled by someone well before the timeout,
    stay database errors (retried, not shrunk)."""
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        if not is_query_canceled(exc):
            raise
        # From when a page read ahead began, if the read was one: it ran that long.
        elapsed = time.monotonic() - started
        if read_state.arrow is not None:
            elapsed += read_state.arrow.page_age_seconds
        if not read_state.timeout_known:  # read once, on its own connection
            with connection.engine.connect() as fresh:
                read_state.statement_timeout = statement_timeout_seconds(fresh)
            read_state.timeout_known = True
        if not ran_into_timeout(elapsed, read_state.statement_timeout):
            raise
        raise WindowTimeoutError(str(exc)) from exc


def _read_next(
    engine: sa.Engine, monitor: MonitorSettings, source: SourceTable, models: ModelCache,
    started: dt.datetime, read_state: ReadState, limit: int,
) -> tuple[CursorState | None, ModelVersion | None, LoadedModel | None, Window | None, str]:
    """The cursor, the active version, its model and the next window; or a reason why
    there is none."""
    with engine.connect() as connection:
        cursor = read_cursor(connection, monitor.name)
        if cursor is None:
            return None, None, None, None, "no_model"
        if cursor.paused:
            return cursor, None, None, None, "paused"
        version = models.active_version(connection, monitor.name)
        if version is None:
            return cursor, None, None, None, "no_model"
        check_features(monitor, version)
        ready_before = future_from = None
        if monitor.query_delay_seconds > 0:
            ready_before = started - dt.timedelta(seconds=monitor.query_delay_seconds)
            future_from = _future_from(started)
        # Stop at rows an open transaction may overtake (a view has no xmin: its
        # monitor relies on query_delay_seconds, which reflect_source requires).
        hold_back = is_postgresql(engine) and not source.is_view
        arrow = read_state.reader(engine)
        with _window_read(connection, read_state):
            window = read_window(connection, source, cursor.position, limit,
                                 features=version.features, ready_before=ready_before,
                                 future_from=future_from, hold_back=hold_back, arrow=arrow,
                                 plain=read_state.plain(limit),
                                 read_ahead=read_state.read_ahead)
        held = window.horizon if window.last_id is None else None
        if hold_back and read_state.stalled(held, time.monotonic()):
            log.warning("monitor %s: a transaction open for over %.0f s holds rows after id "
                        "%s back; reading past it (the sweep scores what it commits later)",
                        monitor.name, HORIZON_MAX_STALL_SECONDS, window.held_back)
            with _window_read(connection, read_state):
                window = read_window(connection, source, cursor.position, limit,
                                     features=version.features, ready_before=ready_before,
                                     future_from=future_from, arrow=arrow,
                                     read_ahead=read_state.read_ahead)
        check_position(connection, source, cursor.position, cursor.position_timestamp,
                       caught_up=window.last_id is None and window.held_back is None)
        model = models.model(connection, version) if window.size else None
    read_state.last_rows = window.size
    return cursor, version, model, window, "read"


def run_batch(
    engine: sa.Engine,
    monitor: MonitorSettings,
    source: SourceTable,
    models: ModelCache,
    *,
    lease: Lease | None = None,
    read_state: ReadState | None = None,
    clock: Callable[[], dt.datetime] = utcnow,
) -> BatchResult:
    """Score the next window after the monitor's cursor and commit it atomically.

    Reads at most ``monitor.batch_size`` rows in id order, stopping before rows
    younger than ``query_delay_seconds`` and, on PostgreSQL, before rows that may
    overtake a still-open transaction. Rows with NULL, NaN, infinite or
    non-numeric values are quarantined with a reason; the others are scored and
    those above the threshold inserted into ``am_anomalies``. The ids in the
    window that were not visible are recorded as the batch's gaps for
    :func:`sweep_late_rows`. Raises :class:`BatchConflictError` when the cursor
    moved or ``lease`` was taken over meanwhile.
    """
    if read_state is None:  # a one-off batch: plain reads
        once = ReadState(use_arrow=False)
        try:
            return run_batch(engine, monitor, source, models, lease=lease, read_state=once,
                             clock=clock)
        finally:
            once.close()
    started = clock()
    t0 = time.perf_counter()
    limit = read_state.limit(monitor.batch_size)
    try:
        cursor, version, model, window, status = _read_next(engine, monitor, source, models,
                                                            started, read_state, limit)
    except WindowTimeoutError:
        if read_state.cancelled:
            raise
        return _read_timed_out(engine, monitor, source, models, read_state, limit,
                               lease=lease, clock=clock, t0=t0)
    if window is not None:
        read_state.read_in_time(time.monotonic())
    if cursor is None or window is None:
        return BatchResult(monitor.name, status)
    if model is None or window.last_id is None:
        nothing = window.size == 0 and window.held_back is None and \
            monitor.query_delay_seconds == 0
        return BatchResult(monitor.name, "idle", position=cursor.position,
                           generation=cursor.generation, version=version,
                           nothing_after=nothing)
    full = window.size >= limit
    gaps = gap_ranges(np.concatenate([window.ids, [b.source_id for b in window.bad]])
                      if window.bad else window.ids,
                      cursor.position, window.last_id)
    read_state.gap_rows = None
    if len(gaps) > MAX_GAP_RANGES:  # end the window before the first gap not recorded
        window.truncate(gaps[MAX_GAP_RANGES][0])
        gaps, full = gaps[:MAX_GAP_RANGES], True
        read_state.gap_rows = window.size
    if monitor.query_delay_seconds > 0:  # counted on the rows this batch keeps
        _note_future_rows(monitor.name, window, _future_from(started), read_state)
    with engine.connect() as connection:
        stream = stream_context(connection, source, model, window)
        watch = watch_batch(connection, monitor, source, models, model, window)
    flagged, severities, seen = _score(monitor, model, window, started, stream, watch,
                                       cursor.generation)
    result = dataclasses.replace(
        _result(monitor, model, window, flagged, severities, caught_up=not full),
        future_rows=window.future_rows, drift=seen.drift, shadow=seen.shadow,
        **_stream_counts(stream))
    batch = _batch_row(result, started, "window", gaps, t0)
    if gaps:
        read_state.open_gaps = True
    # The timestamp of the row the cursor moves to, read as check_position reads it.
    with engine.connect() as connection:
        anchor = timestamp_at(connection, source, window.last_id)
    last_stamp = anchor[1] if anchor is not None and anchor[0] == window.last_id else None
    now = clock()
    written = _commit(engine, monitor, lease, now, window, flagged, batch,
                      generation=cursor.generation,
                      move=(cursor.position, window.last_id, last_stamp),
                      also=_chain(state_writer(model, stream, now), *seen.writers),
                      gap_seconds=incident_gap(monitor, model.version))
    return dataclasses.replace(written.applied(result),
                               duration_seconds=time.perf_counter() - t0,
                               position=window.last_id, generation=cursor.generation,
                               version=version)


def _score(monitor: MonitorSettings, model: LoadedModel, window: Window,
           started: dt.datetime, stream: StreamContext | None, watch: Watch, generation: int,
           ) -> tuple[list[dict[str, Any]], npt.NDArray[np.float64], Observation]:
    """The window's flags and severities, and what the batch observed (drift, shadow)."""
    if len(window.ids) == 0:
        return [], np.zeros(0), watch.observe(window, None, [], generation, started)
    scored = score_rows(model, window, stream)
    flagged, severities = flag_rows(monitor.name, model, window, started, stream, scored)
    return flagged, severities, watch.observe(window, scored, flagged, generation, started)


def _chain(*writes: Callable[[sa.Connection], None] | None
           ) -> Callable[[sa.Connection], None] | None:
    """One write that runs each of ``writes`` (``None`` ones skipped) in order."""
    todo = [w for w in writes if w is not None]
    if not todo:
        return None

    def write(connection: sa.Connection) -> None:
        for w in todo:
            w(connection)

    return write


def probe_next_id(engine: sa.Engine, source: SourceTable, position: int, *,
                  stopping: Callable[[], bool]) -> int | None:
    """The id after ``position`` (:func:`next_id`); :class:`SlowReadError` when not even
    that can be read within the statement timeout (unless ``stopping()``: the query
    was cancelled for a stop)."""
    try:
        with engine.connect() as connection:
            return next_id(connection, source, position)
    except Exception as exc:
        if is_query_canceled(exc) and not stopping():
            raise SlowReadError(source, position) from None
        raise


def _read_timed_out(
    engine: sa.Engine, monitor: MonitorSettings, source: SourceTable, models: ModelCache,
    read_state: ReadState, limit: int, *, lease: Lease | None,
    clock: Callable[[], dt.datetime], t0: float,
) -> BatchResult:
    """A window of ``limit`` rows ran past the statement timeout: read fewer next time
    (status ``slow``); at one row, quarantine that row if its id can be read, else
    raise :class:`SlowReadError` (the monitor pauses)."""
    with engine.connect() as connection:
        cursor = read_cursor(connection, monitor.name)
        version = models.active_version(connection, monitor.name) if cursor else None
    if cursor is None or version is None or cursor.paused:
        return BatchResult(monitor.name, "paused" if cursor and cursor.paused else "no_model")
    rows = read_state.timed_out(limit, time.monotonic())
    if limit > 1:
        log.warning("monitor %s: reading %d rows after id %d ran past the statement "
                    "timeout; reading %d at a time", monitor.name, limit, cursor.position,
                    rows)
        return BatchResult(monitor.name, "slow", caught_up=False, position=cursor.position,
                           generation=cursor.generation, version=version)
    found = probe_next_id(engine, source, cursor.position,
                          stopping=lambda: read_state.cancelled)
    if found is None:  # the row is gone
        return BatchResult(monitor.name, "idle", position=cursor.position,
                           generation=cursor.generation, version=version)
    started = clock()
    bad = BadRow(found, "read_timeout", "reading this row ran past the statement timeout; "
                 "its values were not read", {})
    window = Window(ids=np.zeros(0, dtype=np.int64), raw_timestamps=[],
                    values=np.zeros((0, len(version.features))), bad=[bad], last_id=found)
    result = BatchResult(monitor.name, "committed", quarantined=1, first_id=found,
                         last_id=found, model_version=version.version, caught_up=False,
                         quarantine_reasons={"read_timeout": 1})
    gaps = gap_ranges([found], cursor.position, found)
    batch = _batch_row(result, started, "window", gaps, t0)
    if gaps:
        read_state.open_gaps = True
    _commit(engine, monitor, lease, clock(), window, [], batch,
            generation=cursor.generation, move=(cursor.position, found, None))
    read_state.slow_row_skipped()
    log.warning("monitor %s: row %d cannot be read within the statement timeout; "
                "quarantined it (read_timeout) and went on", monitor.name, found)
    return dataclasses.replace(result, duration_seconds=time.perf_counter() - t0,
                               position=found, generation=cursor.generation, version=version)


def sweep_due(started_at: dt.datetime, since: dt.datetime | None, now: dt.datetime) -> bool:
    """Whether a batch started at ``started_at`` has its open gaps read by a sweep at
    ``now`` when the previous sweep was at ``since`` (``None``: unknown, read them)."""
    age = (now - started_at).total_seconds()
    if since is None or age < EAGER_SWEEP_SECONDS or age >= GAP_RETENTION_SECONDS:
        return True
    before = (since - started_at).total_seconds()
    checkpoint = EAGER_SWEEP_SECONDS
    while checkpoint < GAP_RETENTION_SECONDS:
        checkpoint = min(2 * checkpoint, GAP_RETENTION_SECONDS)
        if before < checkpoint <= age:
            return True
    return False


def sweep_late_rows(
    engine: sa.Engine,
    monitor: MonitorSettings,
    source: SourceTable,
    models: ModelCache,
    *,
    lease: Lease | None = None,
    clock: Callable[[], dt.datetime] = utcnow,
    known: tuple[int, int, ModelVersion] | None = None,
    since: dt.datetime | None = None,
    read_state: ReadState | None = None,
) -> BatchResult | None:
    """Score rows that became visible inside earlier batches' open gaps (late commits).

    The open gaps of the batches due (:func:`sweep_due`; ``since`` is when the
    previous sweep ran) are read; rows found there are scored like a batch and written
    with a ``late`` batch record, and the gaps they fill are closed, all in one
    transaction. Gaps of batches older than
    ``GAP_RETENTION_SECONDS`` are closed after this last look. ``None`` when nothing
    was found or closed. ``known`` is the cursor position, its generation and the
    active version when the caller has just read them in a batch of the same poll
    (the fenced commit still checks that the lease holds and the monitor is not paused).
    With ``read_state`` whose ``open_gaps`` is ``False``, and ``since`` given, nothing is
    read: the monitor has no open gap.
    """
    if read_state is not None and read_state.open_gaps is False and since is not None:
        return None
    started = clock()
    t0 = time.perf_counter()
    with engine.connect() as connection:
        if known is not None:
            position, generation, version = known
        else:
            cursor = read_cursor(connection, monitor.name)
            found_version = models.active_version(connection, monitor.name) if cursor else None
            if cursor is None or cursor.paused or found_version is None:
                return None
            position, generation, version = cursor.position, cursor.generation, found_version
        open_batches = connection.execute(
            sa.select(batches.c.id, batches.c.started_at)
            .where(batches.c.monitor == monitor.name, batches.c.open_gaps.is_not(None))
        ).all()
        if read_state is not None:
            read_state.open_gaps = bool(open_batches)
        due = [row.id for row in open_batches
               if sweep_due(as_utc(row.started_at), since, started)]
        pending = [row for start in range(0, len(due), DUE_BATCHES_PER_QUERY)
                   for row in connection.execute(  # the gap lists of the due batches only
                       sa.select(batches.c.id, batches.c.open_gaps, batches.c.started_at)
                       .where(batches.c.id.in_(due[start:start + DUE_BATCHES_PER_QUERY])))]
        window = read_gaps(connection, source, [row.open_gaps for row in pending], position,
                           features=version.features)
        model = models.model(connection, version) if window.size else None
        stream = (stream_context(connection, source, model, window, late=True)
                  if model is not None else None)
    expired = {row.id for row in pending
               if as_utc(row.started_at) < started - dt.timedelta(seconds=GAP_RETENTION_SECONDS)}
    if window.size == 0 and not expired:
        return None
    found = [*window.ids.tolist(), *(b.source_id for b in window.bad)]
    flagged, severities = (score_window(monitor.name, model, window, started, stream)
                           if model else ([], None))

    def close_gaps(connection: sa.Connection) -> None:
        for row in pending:
            left = [] if row.id in expired else subtract_ids(row.open_gaps, found)
            if left != row.open_gaps:
                connection.execute(batches.update().where(batches.c.id == row.id,
                                                          batches.c.open_gaps.is_not(None))
                                   .values(open_gaps=left or None))

    result = batch = None
    if model is not None and severities is not None:
        result = dataclasses.replace(
            _result(monitor, model, window, flagged, severities, caught_up=True),
            **_stream_counts(stream))
        holes = gap_ranges(found, result.first_id - 1, result.last_id)
        batch = _batch_row(result, started, "late", holes, t0)
    written = _commit(engine, monitor, lease, clock(), window, flagged, batch,
                      generation=generation, also=close_gaps,
                      gap_seconds=incident_gap(monitor, version))
    if result is None:
        return None
    result = written.applied(result)
    log.warning("monitor %s: %d row(s) committed late were found behind the cursor and scored",
                monitor.name, result.rows)
    return dataclasses.replace(result, duration_seconds=time.perf_counter() - t0,
                               position=position, version=version)
