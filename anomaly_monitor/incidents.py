"""Incidents: the flags of one monitor and entity that follow each other within a gap.

Grouping rule (source time, not the time of scoring, so that a catch-up groups the
same way as live scoring):

- A flag joins the incident of its entity (``None`` for a row monitor) whose span
  ``[first_timestamp - gap, last_timestamp + gap]`` holds the flag's source
  timestamp; of several, the one that ends last. Otherwise it opens a new incident.
  A batch's flags are taken in (entity, timestamp, id) order, so that they group
  among themselves as well as with the stored incidents; a late row joins the
  incident it falls into, closed or not, and merges two that it bridges. So an
  entity's incidents are always the runs of its flags with no more than ``gap``
  between two, whatever order the rows were scored in.
- An incident is *open* while the newest source timestamp the monitor has scored (the
  horizon: the row at the cursor, or the newest row of the batch) is at most ``gap``
  after its last flag; every batch closes those it has moved past.
- A flag without a readable timestamp joins its entity's newest open incident (or
  opens one that the next batch closes). Rows stamped more than an hour ahead of the
  clock do not move the horizon; their incidents close once they have not grown for
  ``gap``.
- ``gap`` is ``[monitor.incidents] gap_seconds``; by default ``GAP_INTERVALS``
  sampling intervals of the active version's training rows (per entity), and for a
  version trained before that was stored, ``GAP_INTERVALS`` polling intervals.

Incidents are written in the transaction of their batch, with each flag's
``incident_id``: a batch rolled back (a crash, a lost lease) leaves them as they
were, so that a kill -9 neither splits nor duplicates one. A cursor reset (a new
generation) starts new incidents.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.reading.values import future_from
from anomaly_monitor.registry import ModelVersion
from anomaly_monitor.source import SourceTable
from anomaly_monitor.tables import anomalies, as_utc, cursors, feedback, incidents

#: The default gap is this many sampling intervals of the stream (or polling intervals).
GAP_INTERVALS = 3
#: Open incidents of a monitor exported as ``anomaly_monitor_incident_severity`` series
#: (those of highest severity): the alert's series stay bounded.
MAX_ALERT_SERIES = 50
#: A closed incident keeps its alert series this long after it closed (wall time), so
#: that one opened and closed within a catch-up is still alerted on.
ALERT_HOLD_SECONDS = 600.0
#: Features named in an incident's summary.
TOP_FEATURES = 3


def sample_interval(samples: float, first: dt.datetime | None,
                    last: dt.datetime | None) -> float | None:
    """The mean time between two of a stream's ``samples`` over ``first`` to ``last``;
    ``None`` without a time span."""
    if first is None or last is None or samples <= 1:
        return None
    seconds = (last - first).total_seconds() / (samples - 1)
    return seconds if seconds > 0 else None


def stream_samples(connection: sa.Connection, source: SourceTable, first_id: int,
                   last_id: int, rows: int, entities: int | None) -> float:
    """How many samples one stream has in a training window of ``rows`` rows: a window
    monitor's rows per entity; a row monitor's distinct timestamps (a table of several
    hosts without an entity column writes several rows per time)."""
    if entities is not None:
        return rows / max(1, entities)
    return float(connection.execute(
        sa.select(sa.func.count(sa.distinct(source.timestamp_column)))
        .where(source.id_column.between(first_id, last_id))).scalar_one())


def incident_gap(monitor: MonitorSettings, version: ModelVersion | None) -> float:
    """Seconds of source time between two flags of one incident, at most."""
    if monitor.incidents.gap_seconds is not None:
        return monitor.incidents.gap_seconds
    interval = (version.training.get("sample_interval_seconds")
                if version is not None else None)
    return GAP_INTERVALS * float(interval or monitor.interval_seconds)


def feature_name(input_name: str) -> str:
    """The feature of a model input: ``cpu[t-3]`` and ``cpu[t]`` are ``cpu``; derived
    inputs keep their kind (``cpu.diff``)."""
    return input_name.split("[", 1)[0]


@dataclass
class _Incident:
    """An incident being grouped: its stored row (``id`` ``None`` when new) and the
    flags that joined it in this batch."""

    row: dict[str, Any]
    flags: list[dict[str, Any]] = field(default_factory=list)

    @property
    def first(self) -> dt.datetime | None:
        return as_utc(self.row["first_timestamp"])

    @property
    def last(self) -> dt.datetime | None:
        return as_utc(self.row["last_timestamp"])

    def holds(self, when: dt.datetime, gap: dt.timedelta) -> bool:
        if self.first is None or self.last is None:
            return False
        return self.first - gap <= when <= self.last + gap

    def recency(self) -> tuple[dt.datetime, int]:
        return (self.last or dt.datetime.min.replace(tzinfo=dt.UTC), self.row["id"] or 2**62)

    def add(self, flag: dict[str, Any]) -> None:
        row, when = self.row, flag["source_timestamp"]
        row["first_source_id"] = min(row["first_source_id"], flag["source_id"])
        row["last_source_id"] = max(row["last_source_id"], flag["source_id"])
        if when is not None:
            row["first_timestamp"] = min(filter(None, (self.first, when)))
            row["last_timestamp"] = max(filter(None, (self.last, when)))
        row["rows"] += 1
        row["max_severity"] = max(row["max_severity"], float(flag["severity"]))
        row["feature_shares"] = _summed(row["feature_shares"], (
            (feature_name(part["feature"]), float(part["share"]))
            for part in flag["contributions"]))
        self.flags.append(flag)


def _summed(shares: dict[str, float], more: Iterable[tuple[str, float]]) -> dict[str, float]:
    """``shares`` (feature: summed share) with ``more`` added, as a new dict."""
    total = dict(shares)
    for name, share in more:
        total[name] = round(total.get(name, 0.0) + share, 6)
    return total


def _new(monitor: str, generation: int, flag: dict[str, Any], now: dt.datetime) -> _Incident:
    when = flag["source_timestamp"]
    incident = _Incident({
        "id": None, "monitor": monitor, "generation": generation, "entity": flag["entity"],
        "first_source_id": flag["source_id"], "last_source_id": flag["source_id"],
        "first_timestamp": when, "last_timestamp": when, "rows": 0, "max_severity": 0.0,
        "feature_shares": {}, "state": "open", "label": None,
        "model_version": flag["model_version"], "opened_at": now, "updated_at": now,
        "closed_at": None})
    incident.add(flag)
    return incident


def _order(flag: dict[str, Any]) -> tuple[Any, ...]:
    when = flag["source_timestamp"]
    return (flag["entity"] or "", when is None, when or dt.datetime.min.replace(tzinfo=dt.UTC),
            flag["source_id"])


@dataclass
class Grouping:
    """What :func:`group` did: the incidents to write, and the stored incidents merged
    into another (their id: the incident that absorbed them)."""

    touched: list[_Incident]
    merged: dict[int, _Incident]


def _absorb(keep: _Incident, other: _Incident) -> None:
    """Merge ``other`` into ``keep`` (a flag bridged the two)."""
    a, b = keep.row, other.row
    earlier = b if (other.first or dt.datetime.max.replace(tzinfo=dt.UTC)) < \
        (keep.first or dt.datetime.max.replace(tzinfo=dt.UTC)) else a
    a["model_version"] = earlier["model_version"]
    a["first_source_id"] = min(a["first_source_id"], b["first_source_id"])
    a["last_source_id"] = max(a["last_source_id"], b["last_source_id"])
    a["first_timestamp"] = min(filter(None, (keep.first, other.first)), default=None)
    a["last_timestamp"] = max(filter(None, (keep.last, other.last)), default=None)
    a["rows"] += b["rows"]
    a["max_severity"] = max(a["max_severity"], b["max_severity"])
    a["feature_shares"] = _summed(a["feature_shares"], b["feature_shares"].items())
    a["opened_at"] = min(a["opened_at"], b["opened_at"])
    a["label"] = merged_label([a["label"], b["label"]])
    keep.flags.extend(other.flags)


def group(flags: Iterable[dict[str, Any]], stored: Sequence[dict[str, Any]], *,
          monitor: str, generation: int, gap_seconds: float, now: dt.datetime) -> Grouping:
    """The incidents that ``flags`` join, open or merge, given the ``stored``
    incidents they may join (see the module docstring). A flag within the gap of
    several incidents (a late row between two) merges them into the oldest, so that
    the incidents are always the groups that all the flags would form at once, in
    whatever order they were scored."""
    gap = dt.timedelta(seconds=gap_seconds)
    by_entity: dict[str | None, list[_Incident]] = defaultdict(list)
    for row in stored:
        by_entity[row["entity"]].append(_Incident(dict(row)))
    touched: dict[int, _Incident] = {}
    merged: dict[int, _Incident] = {}
    for flag in sorted(flags, key=_order):
        candidates = by_entity[flag["entity"]]
        when = flag["source_timestamp"]
        if when is None:  # the entity's newest open incident, if any
            live = [c for c in candidates if c.row["state"] == "open"]
            holding = [max(live, key=_Incident.recency)] if live else []
        else:
            holding = [c for c in candidates if c.holds(when, gap)]
        if not holding:
            incident = _new(monitor, generation, flag, now)
            candidates.append(incident)
        else:  # the oldest stored one (lowest id) absorbs the others
            holding.sort(key=lambda c: (c.row["id"] is None, c.row["id"] or 0))
            incident = holding[0]
            for other in holding[1:]:
                _absorb(incident, other)
                candidates.remove(other)
                touched.pop(id(other), None)
                if other.row["id"] is not None:
                    merged[other.row["id"]] = incident
            incident.add(flag)
        touched[id(incident)] = incident
    return Grouping(list(touched.values()), merged)


def horizon(connection: sa.Connection, monitor: str, newest: dt.datetime | None,
            now: dt.datetime) -> dt.datetime | None:
    """The newest source time scored: the cursor row's timestamp or ``newest``, leaving
    out times more than ``FUTURE_TOLERANCE_SECONDS`` (``anomaly_monitor.reading.values``)
    ahead of ``now`` (mis-stamped rows
    must not close every other incident)."""
    at_cursor = as_utc(connection.execute(
        sa.select(cursors.c.position_timestamp).where(cursors.c.monitor == monitor)
    ).scalar())
    latest = future_from(now)
    return max((t for t in (at_cursor, newest) if t is not None and t <= latest), default=None)


_TIMES = ("first_timestamp", "last_timestamp", "opened_at", "updated_at", "closed_at")


def _candidates(connection: sa.Connection, scope: list[sa.ColumnElement[bool]],
                flags: list[dict[str, Any]], gap: dt.timedelta) -> list[dict[str, Any]]:
    """The stored incidents the flags may join: the open ones, and the closed ones
    whose span widened by ``gap`` reaches the flags' times (two indexed reads)."""
    rows = list(connection.execute(
        sa.select(incidents).where(*scope, incidents.c.state == "open")).mappings())
    times = [f["source_timestamp"] for f in flags if f["source_timestamp"] is not None]
    if times:
        rows += connection.execute(sa.select(incidents).where(
            *scope, incidents.c.state == "closed",
            incidents.c.last_timestamp >= min(times) - gap,
            incidents.c.first_timestamp <= max(times) + gap)).mappings()
    # SQLite returns naive datetimes (stored as UTC).
    return [{**row, **{key: as_utc(row[key]) for key in _TIMES}} for row in rows]


def _write(connection: sa.Connection, grouping: Grouping, upto: dt.datetime | None,
           gap: dt.timedelta, now: dt.datetime) -> int:
    """Store the grouping; returns the number of incidents inserted."""
    absorbed: dict[int, list[str | None]] = defaultdict(list)
    for gone, into in grouping.merged.items():
        while into.row["id"] in grouping.merged:  # absorbed in turn by another
            into = grouping.merged[into.row["id"]]
        connection.execute(anomalies.update().where(anomalies.c.incident_id == gone)
                           .values(incident_id=into.row["id"]))
        # The labels given on the absorbed incident now name the one it became.
        connection.execute(feedback.update().where(
            feedback.c.target == "incident", feedback.c.target_id == gone)
            .values(target_id=into.row["id"]))
        absorbed[id(into)].append(connection.execute(
            incidents.delete().where(incidents.c.id == gone)
            .returning(incidents.c.label)).scalar())
    opened = 0
    for incident in grouping.touched:
        row, last = incident.row, incident.last
        is_open = upto is None or last is None or last >= upto - gap
        row["state"] = "open" if is_open else "closed"
        row["closed_at"] = None if is_open else (row["closed_at"] or now)
        row["updated_at"] = now
        values = {k: v for k, v in row.items() if k != "id"}
        label = None
        if row["id"] is None:
            row["id"] = connection.execute(
                incidents.insert().values(**values)).inserted_primary_key[0]
            opened += 1
        else:
            label = _update(connection, row["id"], values, absorbed.get(id(incident)))
        for flag in incident.flags:
            flag["incident_id"], flag["label"] = row["id"], label
    return opened


def _update(connection: sa.Connection, incident_id: int, values: dict[str, Any],
            absorbed: list[str | None] | None) -> str | None:
    """Update a stored incident; returns its label. The label is the operator's: kept
    as stored, read back after the row lock (a label given while this batch ran reaches
    the flags joining the incident); when the incident absorbed others it becomes
    :func:`merged_label` of theirs and its own, and its unlabelled flags take it."""
    values = {k: v for k, v in values.items() if k != "label"}
    if absorbed is not None:
        own = connection.execute(sa.select(incidents.c.label).where(
            incidents.c.id == incident_id).with_for_update()).scalar()
        values["label"] = merged_label([own, *absorbed])
    label: str | None = connection.execute(
        incidents.update().where(incidents.c.id == incident_id).values(**values)
        .returning(incidents.c.label)).scalar_one()
    if absorbed is not None and label is not None:
        connection.execute(anomalies.update().where(
            anomalies.c.incident_id == incident_id, anomalies.c.label.is_(None))
            .values(label=label))
    return label


def merged_label(labels: Iterable[str | None]) -> str | None:
    """The label of incidents merged into one: ``tp`` if one of them was a real
    anomaly, else ``fp`` if one was labelled a false alarm, else none."""
    given = set(labels)
    return "tp" if "tp" in given else "fp" if "fp" in given else None


def _close_stale(connection: sa.Connection, monitor: str, generation: int,
                 upto: dt.datetime | None, gap: dt.timedelta, now: dt.datetime) -> None:
    """Close the open incidents the horizon has moved past, those of older generations,
    those of flags without a timestamp (at the next batch), and mis-stamped ones (far in
    the future) once they have not grown for ``gap``."""
    ahead = future_from(now)
    stale = [incidents.c.generation != generation,
             sa.and_(incidents.c.last_timestamp.is_(None), incidents.c.updated_at < now),
             sa.and_(incidents.c.last_timestamp > ahead, incidents.c.updated_at < now - gap)]
    if upto is not None:
        stale.append(incidents.c.last_timestamp < upto - gap)
    connection.execute(incidents.update().where(
        incidents.c.monitor == monitor, incidents.c.state == "open", sa.or_(*stale)
    ).values(state="closed", closed_at=now, updated_at=now))


def record_incidents(connection: sa.Connection, monitor: str, generation: int,
                     flags: list[dict[str, Any]], *, gap_seconds: float,
                     newest: dt.datetime | None, now: dt.datetime) -> int:
    """Group ``flags`` (flag rows about to be inserted, in this transaction) into
    incidents, set each flag's ``incident_id``, and close the incidents the horizon
    has moved past. Returns how many incidents were opened."""
    gap = dt.timedelta(seconds=gap_seconds)
    upto = horizon(connection, monitor, newest, now)
    opened = 0
    if flags:
        scope = [incidents.c.monitor == monitor, incidents.c.generation == generation]
        grouping = group(flags, _candidates(connection, scope, flags, gap), monitor=monitor,
                         generation=generation, gap_seconds=gap_seconds, now=now)
        opened = _write(connection, grouping, upto, gap, now)
    _close_stale(connection, monitor, generation, upto, gap, now)
    return opened


def top_features(shares: dict[str, float], rows: int) -> list[dict[str, Any]]:
    """The incident's ``TOP_FEATURES`` features by their mean share of its flags' scores."""
    ranked = sorted(shares.items(), key=lambda item: (-item[1], item[0]))[:TOP_FEATURES]
    return [{"feature": name, "share": round(total / max(1, rows), 4)}
            for name, total in ranked]


def alerting_incidents(connection: sa.Connection, monitor: str, min_severity: float,
                       now: dt.datetime) -> list[tuple[int, str, float]]:
    """The incidents of ``monitor`` with a severity of at least ``min_severity`` that are
    open, or closed less than ``ALERT_HOLD_SECONDS`` before ``now`` (an incident that
    opened and closed within one batch of a catch-up still raises its alert), and not
    labelled a false positive (the operator's label silences its alert): id,
    entity or ``""``, severity; at most ``MAX_ALERT_SERIES``, the most severe."""
    recent = now - dt.timedelta(seconds=ALERT_HOLD_SECONDS)
    live = sa.or_(incidents.c.state == "open", incidents.c.closed_at >= recent)
    rows = connection.execute(
        sa.select(incidents.c.id, incidents.c.entity, incidents.c.max_severity)
        .where(incidents.c.monitor == monitor, live,
               incidents.c.max_severity >= min_severity,
               sa.or_(incidents.c.label.is_(None), incidents.c.label != "fp"))
        .order_by(incidents.c.max_severity.desc(), incidents.c.id)
        .limit(MAX_ALERT_SERIES)).all()
    return [(int(r.id), r.entity or "", float(r.max_severity)) for r in rows]


def open_count(connection: sa.Connection, monitor: str) -> int:
    """How many incidents of ``monitor`` are open."""
    return int(connection.execute(
        sa.select(sa.func.count()).select_from(incidents)
        .where(incidents.c.monitor == monitor, incidents.c.state == "open")).scalar_one())
