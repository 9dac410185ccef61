"""Operator feedback: flagged rows and incidents labelled true (``tp``) or false (``fp``)
positives.

Every label given is a new ``am_feedback`` row (who, when, label, note); the newest
one on a flag or incident is its label, the older ones stay as its history. The
current label is also kept on the flag (``am_anomalies.label``) and the incident
(``am_incidents.label``), written in the same transaction, so that listings filter
on it without reading the history:

- labelling a flag sets that flag's label;
- labelling an incident sets the incident's label and that of every flag in it
  (a later label of one of its flags overrides it for that flag); flags that join
  the incident afterwards take its label (``anomaly_monitor.incidents``).

Labels are used by ``calibrate`` (``--method labels`` and the dry run's precision and
recall when the monitor has no label column), by ``train`` (rows labelled ``tp`` are
left out of the training window) and by the precision metric; a false-positive
incident raises no alert.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.tables import (
    LABELS,
    anomalies,
    as_utc,
    cursors,
    feedback,
    incidents,
    utcnow,
)

#: ``anomaly_monitor_feedback_precision`` is measured over this many of the newest
#: labelled flags (by source id within the newest generation).
PRECISION_WINDOW_FLAGS = 100
#: A note is cut to this many characters.
NOTE_MAX_CHARS = 2000
#: Ids looked up per query.
ID_PAGE = 500


class FeedbackError(ValueError):
    """The ids given are not flags (or incidents) of the monitor."""


@dataclass(frozen=True)
class Labelled:
    """What :func:`label` did: the feedback rows written and the flags and incidents
    whose label it set."""

    feedback_ids: list[int]
    flags: int
    incidents: list[int]


def _pages(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i:i + ID_PAGE] for i in range(0, len(ids), ID_PAGE)]


def _missing(found: set[int], ids: Sequence[int], what: str, monitor: str,
             listing: str) -> None:
    unknown = sorted(set(ids) - found)
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        raise FeedbackError(
            f"monitor {monitor!r} has no {what} with id {shown} "
            f"(anomaly-monitor {listing} {monitor} lists them); nothing was labelled")


def _flags(connection: sa.Connection, monitor: str,
           source_ids: Sequence[int]) -> list[sa.Row[tuple[int, int, int]]]:
    """The flag of each source id, of the newest cursor generation that flagged it."""
    found: dict[int, sa.Row[tuple[int, int, int]]] = {}
    for page in _pages(source_ids):
        for row in connection.execute(
                sa.select(anomalies.c.id, anomalies.c.source_id, anomalies.c.generation)
                .where(anomalies.c.monitor == monitor, anomalies.c.source_id.in_(page))):
            held = found.get(row.source_id)
            if held is None or row.generation > held.generation:
                found[row.source_id] = row
    _missing(set(found), source_ids, "flagged row", monitor, "anomalies")
    return list(found.values())


def _label_incidents(connection: sa.Connection, monitor: str, ids: Sequence[int],
                     verdict: str) -> tuple[list[dict[str, object]], int]:
    """Set the label of the incidents ``ids`` and their flags; their feedback targets
    and the number of flags labelled."""
    found = {int(r.id): int(r.generation) for page in _pages(ids) for r in connection.execute(
        sa.select(incidents.c.id, incidents.c.generation)
        .where(incidents.c.monitor == monitor, incidents.c.id.in_(page)))}
    _missing(set(found), ids, "incident", monitor, "incidents")
    flagged = 0
    for page in _pages(ids):  # the incident first: its row lock orders it with batches
        done = connection.execute(incidents.update().where(incidents.c.id.in_(page))
                                  .values(label=verdict)).rowcount
        if done != len(page):  # a batch merged one into another since it was read
            raise FeedbackError(f"an incident of {', '.join(map(str, page[:10]))} of monitor "
                                f"{monitor!r} was merged into another meanwhile; nothing "
                                f"was labelled (anomaly-monitor incidents {monitor} lists "
                                "them as they are now)")
        flagged += connection.execute(
            anomalies.update().where(anomalies.c.monitor == monitor,
                                     anomalies.c.incident_id.in_(page))
            .values(label=verdict)).rowcount
    return [{"target": "incident", "target_id": i, "source_id": None,
             "generation": found[i]} for i in ids], flagged


def _label_flags(connection: sa.Connection, monitor: str, source_ids: Sequence[int],
                 verdict: str) -> list[dict[str, object]]:
    """Set the label of the flags of ``source_ids``; their feedback targets."""
    flags = _flags(connection, monitor, source_ids)
    for page in _pages([f.id for f in flags]):
        connection.execute(anomalies.update().where(anomalies.c.id.in_(page))
                           .values(label=verdict))
    return [{"target": "flag", "target_id": f.id, "source_id": f.source_id,
             "generation": f.generation} for f in sorted(flags, key=lambda f: f.source_id)]


def label(connection: sa.Connection, monitor: str, ids: Sequence[int], verdict: str, *,
          incident: bool = False, note: str | None = None, author: str,
          now: dt.datetime | None = None) -> Labelled:
    """Label the flags of ``monitor`` with source ids ``ids`` (or, with ``incident``,
    the incidents with ids ``ids`` and their flags) as ``verdict`` (``tp``/``fp``),
    in the caller's transaction. Raises :class:`FeedbackError`, writing nothing, when
    an id is not one of the monitor's."""
    if verdict not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}; got {verdict!r}")
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise FeedbackError("no id given; nothing was labelled")
    if incident:
        targets, flagged = _label_incidents(connection, monitor, wanted, verdict)
    else:
        targets = _label_flags(connection, monitor, wanted, verdict)
        flagged = len(targets)
    common = {"monitor": monitor, "label": verdict, "author": author,
              "note": note[:NOTE_MAX_CHARS] if note else None, "created_at": now or utcnow()}
    written = [int(connection.execute(feedback.insert().values(**common, **target))
                   .inserted_primary_key[0]) for target in targets]
    return Labelled(written, flagged, wanted if incident else [])


def feedback_counts(connection: sa.Connection, monitor: str) -> dict[str, int]:
    """Labels given on ``monitor`` so far (history included), by label."""
    counts = dict.fromkeys(LABELS, 0)
    counts.update({label: int(n) for label, n in connection.execute(
        sa.select(feedback.c.label, sa.func.count()).where(feedback.c.monitor == monitor)
        .group_by(feedback.c.label)).all()})
    return counts


def recent_precision(connection: sa.Connection, monitor: str,
                     window: int = PRECISION_WINDOW_FLAGS) -> tuple[float | None, int]:
    """The share of ``tp`` among the newest ``window`` labelled flags of ``monitor``,
    and how many flags it is measured on (``None`` before any label)."""
    labels = connection.execute(
        sa.select(anomalies.c.label)
        .where(anomalies.c.monitor == monitor, anomalies.c.label.is_not(None))
        .order_by(anomalies.c.generation.desc(), anomalies.c.source_id.desc())
        .limit(window)).scalars().all()
    if not labels:
        return None, 0
    return sum(1 for v in labels if v == "tp") / len(labels), len(labels)


def _generation(connection: sa.Connection, monitor: str) -> int:
    return int(connection.execute(sa.select(cursors.c.generation)
                                  .where(cursors.c.monitor == monitor)).scalar() or 0)


@dataclass(frozen=True)
class LabelledFlags:
    """The labelled flags of the current cursor generation: source id, the score and
    version that flagged each, and whether it is a true positive."""

    source_ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    versions: npt.NDArray[np.int64]
    positive: npt.NDArray[np.bool_]


def labelled_flags(connection: sa.Connection, monitor: str) -> LabelledFlags:
    """The flags of ``monitor``'s current cursor generation that carry a label, in
    source id order (their ids name rows of the table as it is now)."""
    rows = connection.execute(
        sa.select(anomalies.c.source_id, anomalies.c.score, anomalies.c.model_version,
                  anomalies.c.label)
        .where(anomalies.c.monitor == monitor, anomalies.c.label.is_not(None),
               anomalies.c.generation == _generation(connection, monitor))
        .order_by(anomalies.c.source_id)).all()
    return LabelledFlags(np.array([r.source_id for r in rows], dtype=np.int64),
                         np.array([r.score for r in rows], dtype=np.float64),
                         np.array([r.model_version for r in rows], dtype=np.int64),
                         np.array([r.label == "tp" for r in rows], dtype=bool))


#: What ``train`` can leave out of its window: rows labelled true anomalies, every
#: flagged row (here), and rows of suppression windows marked ``skip_training``
#: (``anomaly_monitor.suppression``).
EXCLUDE_CHOICES = ("labelled", "flagged", "suppressed")


def excluded_ids(connection: sa.Connection, monitor: str, first_id: int, last_id: int,
                 exclude: Sequence[str]) -> npt.NDArray[np.int64]:
    """Source ids in ``first_id..last_id`` that training leaves out (see
    :data:`EXCLUDE_CHOICES`), of the current cursor generation, sorted."""
    unknown = set(exclude) - set(EXCLUDE_CHOICES)
    if unknown:
        raise ValueError(f"exclude must be among {', '.join(EXCLUDE_CHOICES)}; got "
                         f"{', '.join(sorted(unknown))}")
    exclude = [e for e in exclude if e != "suppressed"]
    if not exclude:
        return np.zeros(0, dtype=np.int64)
    query = sa.select(anomalies.c.source_id).where(
        anomalies.c.monitor == monitor,
        anomalies.c.generation == _generation(connection, monitor),
        anomalies.c.source_id.between(first_id, last_id))
    if "flagged" not in exclude:
        query = query.where(anomalies.c.label == "tp")
    return np.array(sorted(connection.execute(query).scalars()), dtype=np.int64)


def history(connection: sa.Connection, monitor: str, *,
            limit: int = 50) -> list[dict[str, object]]:
    """The newest ``limit`` labels given on ``monitor``, newest first."""
    rows = connection.execute(sa.select(feedback).where(feedback.c.monitor == monitor)
                              .order_by(feedback.c.id.desc()).limit(limit)).all()
    return [{"id": r.id, "target": r.target, "target_id": r.target_id,
             "source_id": r.source_id, "label": r.label, "note": r.note, "author": r.author,
             "created_at": as_utc(r.created_at).isoformat(timespec="seconds")}
            for r in rows]


#: Alert levels (``[monitor.incidents] alert_severity``) measured on labelled incidents.
ALERT_LEVELS = (0.0, 25.0, 50.0, 75.0, 90.0)


def alert_levels(connection: sa.Connection, monitor: str,
                 levels: Sequence[float] = ALERT_LEVELS) -> list[dict[str, float | int | None]]:
    """For each candidate ``alert_severity``, what it would have alerted on among the
    labelled incidents of ``monitor``: alerts, true and false ones, precision, recall
    (of the incidents labelled ``tp``) and F1. Empty without labelled incidents."""
    rows = connection.execute(
        sa.select(incidents.c.max_severity, incidents.c.label)
        .where(incidents.c.monitor == monitor, incidents.c.label.is_not(None))).all()
    positives = sum(1 for r in rows if r.label == "tp")
    table: list[dict[str, float | int | None]] = []
    if not rows:
        return table
    for level in levels:
        alerted = [r for r in rows if r.max_severity >= level]
        hits = sum(1 for r in alerted if r.label == "tp")
        table.append({
            "alert_severity": level, "alerts": len(alerted), "true": hits,
            "false": len(alerted) - hits,
            "precision": hits / len(alerted) if alerted else None,
            "recall": hits / positives if positives else None,
            "f1": 2 * hits / (len(alerted) + positives) if positives else None})
    return table


def best_alert_level(table: Sequence[dict[str, float | int | None]]) -> float | None:
    """The level of highest F1 (the higher level on a tie: fewer alerts); ``None``
    without a labelled true positive."""
    scored = [row for row in table if row["f1"] is not None]
    if not scored:
        return None
    best = max(scored, key=lambda row: (row["f1"], row["alert_severity"]))
    return float(best["alert_severity"])  # type: ignore[arg-type]
