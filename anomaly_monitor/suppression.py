"""Suppression windows: spans of source time whose flags raise no incident and no alert.

A window is one-off (``anomaly-monitor suppress add``, a row of ``am_suppressions``) or
recurring (``[[monitor.suppress]]`` in the config: a cron expression in a time zone and
a duration, e.g. nightly maintenance). A window covers ``[start, end)`` of the rows'
own timestamps, for every entity or for one. Rows inside it are still scored and
their flags stored, marked (``am_anomalies.suppressed_by``), counted in
``anomaly_monitor_rows_suppressed_total`` and kept out of ``rows_flagged_total``, the
severity histogram, incidents and alerts (Elastic's ``skip_result``). A window with
``skip_training`` also keeps its rows out of training (``skip_model_update``).

The flags of a batch are marked in its transaction, from the windows stored when it
commits: a window added later does not change flags already written.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.config import RecurringWindow
from anomaly_monitor.tables import SUPPRESSED_BY_LENGTH, as_utc, suppressions, utcnow

log = logging.getLogger(__name__)

#: A recurring window is expanded into at most this many spans over one time range
#: (a cron firing every minute over a year of training rows is cut there).
MAX_RECURRING_SPANS = 100_000


class SuppressionError(ValueError):
    """A window that ends before it starts, overlaps another, or does not exist."""


@dataclass(frozen=True)
class Span:
    """One occurrence of a window: ``[start, end)`` (aware UTC), its entity (``None``:
    all), the name flags record, and whether its rows are left out of training."""

    start: dt.datetime
    end: dt.datetime
    entity: str | None
    name: str
    skip_training: bool


@functools.lru_cache(maxsize=256)
def _trigger(cron: str, timezone: str) -> Any:
    """The parsed cron expression (parsed once per process)."""
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(cron, timezone=ZoneInfo(timezone))


def recurring_spans(window: RecurringWindow, first: dt.datetime,
                    last: dt.datetime) -> list[Span]:
    """The occurrences of ``window`` that hold a time in ``[first, last]``."""
    trigger = _trigger(window.cron, window.timezone)
    duration = dt.timedelta(seconds=window.duration_seconds)
    # The first opening after first - duration: its window still holds first.
    fire = trigger.get_next_fire_time(None, first - duration + dt.timedelta(microseconds=1))
    spans: list[Span] = []
    while fire is not None and fire <= last and len(spans) < MAX_RECURRING_SPANS:
        start = fire.astimezone(dt.UTC)
        spans.append(Span(start, start + duration, window.entity,
                          f"recurring {window.name}", window.skip_training))
        fire = trigger.get_next_fire_time(fire, fire)
    if fire is not None and fire <= last:
        log.warning("suppression window %r opens more than %d times from %s to %s; only "
                    "the first %d are applied (until %s)", window.name, MAX_RECURRING_SPANS,
                    first.isoformat(), last.isoformat(), MAX_RECURRING_SPANS,
                    spans[-1].end.isoformat())
    return spans


def _stored_spans(connection: sa.Connection, monitor: str, first: dt.datetime,
                  last: dt.datetime) -> list[Span]:
    rows = connection.execute(sa.select(suppressions).where(
        suppressions.c.monitor == monitor, suppressions.c.removed_at.is_(None),
        suppressions.c.start_at <= last, suppressions.c.end_at > first)).all()
    return [Span(as_utc(r.start_at), as_utc(r.end_at), r.entity,  # type: ignore[arg-type]
                 f"window {r.id}", bool(r.skip_training)) for r in rows]


def spans_between(connection: sa.Connection, monitor: str,
                  recurring: Sequence[RecurringWindow], first: dt.datetime,
                  last: dt.datetime) -> list[Span]:
    """Every window occurrence of ``monitor`` (stored one-off windows not removed, and
    the ``recurring`` ones) that holds a time in ``[first, last]``."""
    spans = _stored_spans(connection, monitor, first, last)
    for window in recurring:
        spans += recurring_spans(window, first, last)
    return spans


def suppress_flags(connection: sa.Connection, monitor: str,
                   recurring: Sequence[RecurringWindow],
                   flags: list[dict[str, Any]]) -> npt.NDArray[np.bool_]:
    """Mark the ``flags`` (rows about to be inserted) stamped inside a window: set each
    one's ``suppressed_by`` (``None`` for the others); returns which were marked."""
    marked = np.zeros(len(flags), dtype=bool)
    for flag in flags:
        flag["suppressed_by"] = None
    stamps = [as_utc(f["source_timestamp"]) for f in flags]
    known = [t for t in stamps if t is not None]
    if not known:
        return marked
    spans = spans_between(connection, monitor, recurring, min(known), max(known))
    if not spans:
        return marked
    times = np.array([np.nan if t is None else t.timestamp() for t in stamps])
    entities = np.array([f["entity"] or "" for f in flags], dtype=object)
    for span in spans:  # one vector test per span (a catch-up batch may meet many)
        inside = ~marked & (times >= span.start.timestamp()) & (times < span.end.timestamp())
        if span.entity is not None:
            inside &= entities == span.entity
        for i in np.flatnonzero(inside):
            flags[i]["suppressed_by"] = span.name[:SUPPRESSED_BY_LENGTH]
        marked |= inside
    return marked


def _overlapping(connection: sa.Connection, monitor: str, start: dt.datetime,
                 end: dt.datetime, entity: str | None) -> sa.Row[Any] | None:
    """A stored window that overlaps ``[start, end)`` for the same entities."""
    same = (sa.true() if entity is None else
            sa.or_(suppressions.c.entity.is_(None), suppressions.c.entity == entity))
    return connection.execute(sa.select(suppressions).where(
        suppressions.c.monitor == monitor, suppressions.c.removed_at.is_(None),
        suppressions.c.start_at < end, suppressions.c.end_at > start, same)
        .order_by(suppressions.c.start_at).limit(1)).first()


def add_window(connection: sa.Connection, monitor: str, start: dt.datetime,
               end: dt.datetime, *, entity: str | None = None, reason: str = "",
               skip_training: bool = False, author: str,
               now: dt.datetime | None = None) -> int:
    """Store a one-off window of ``monitor`` over ``[start, end)`` (aware times);
    returns its id. Raises :class:`SuppressionError` when it ends at or before its start
    or overlaps a stored window of the same entities (a window of all entities
    overlaps every entity's)."""
    if end <= start:
        raise SuppressionError(f"the window ends ({end.isoformat()}) at or before it starts "
                               f"({start.isoformat()}); give --end after --start")
    clash = _overlapping(connection, monitor, start, end, entity)
    if clash is not None:
        whose = "all entities" if clash.entity is None else f"entity {clash.entity!r}"
        raise SuppressionError(
            f"the window overlaps window {clash.id} of monitor {monitor!r} "
            f"({as_utc(clash.start_at).isoformat()} to "  # type: ignore[union-attr]
            f"{as_utc(clash.end_at).isoformat()}, {whose}); "  # type: ignore[union-attr]
            f"remove it first (anomaly-monitor suppress remove {clash.id} --monitor "
            f"{monitor}) or choose another span")
    return int(connection.execute(suppressions.insert().values(
        monitor=monitor, entity=entity, start_at=start, end_at=end, reason=reason,
        skip_training=skip_training, author=author, created_at=now or utcnow(),
    )).inserted_primary_key[0])


def remove_window(connection: sa.Connection, monitor: str, window_id: int, *,
                  now: dt.datetime | None = None) -> None:
    """Remove a stored window from now on (its row stays, for the flags it marked)."""
    removed = connection.execute(suppressions.update().where(
        suppressions.c.id == window_id, suppressions.c.monitor == monitor,
        suppressions.c.removed_at.is_(None)).values(removed_at=now or utcnow())).rowcount
    if not removed:
        raise SuppressionError(f"monitor {monitor!r} has no suppression window {window_id} "
                               f"(anomaly-monitor suppress list {monitor} lists them)")


def list_windows(connection: sa.Connection, monitor: str, *,
                 removed: bool = False) -> list[dict[str, Any]]:
    """The stored windows of ``monitor`` (``removed``: those removed too), by start."""
    query = sa.select(suppressions).where(suppressions.c.monitor == monitor)
    if not removed:
        query = query.where(suppressions.c.removed_at.is_(None))
    rows = connection.execute(query.order_by(suppressions.c.start_at,
                                             suppressions.c.id)).all()
    return [{"id": r.id, "entity": r.entity, "start": _iso(r.start_at), "end": _iso(r.end_at),
             "reason": r.reason, "skip_training": bool(r.skip_training), "author": r.author,
             "created_at": _iso(r.created_at), "removed_at": _iso(r.removed_at)}
            for r in rows]


def _iso(value: dt.datetime | None) -> str | None:
    stamped = as_utc(value)
    return stamped.isoformat(timespec="seconds") if stamped is not None else None


def training_spans(spans: Iterable[Span]) -> list[Span]:
    """The spans whose rows are left out of training."""
    return [s for s in spans if s.skip_training]
