"""What a batch records beside its flags: its drift from the active version's training
reference (``anomaly_monitor.drift``) and the challenger's result in shadow
(``anomaly_monitor.shadow``), both written by the batch's own transaction.

A challenger that cannot score (its artifact fails to load, it reads other features
than the active version) is skipped with a warning: it never holds the active
version's batch back.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.drift import DriftReport, DriftState, drift_writer, read_drift
from anomaly_monitor.entities import state_writer, stream_context
from anomaly_monitor.reading.values import Window
from anomaly_monitor.registry import LoadedModel, ModelCache
from anomaly_monitor.scoring import Scored, StreamContext, check_features
from anomaly_monitor.shadow import (
    ShadowScore,
    active_tail,
    agreement_tail,
    score_shadow,
    shadow_version,
    shadow_writer,
)
from anomaly_monitor.source import SourceTable

log = logging.getLogger(__name__)

Writer = Callable[[sa.Connection], None]


@dataclass
class Observation:
    """A batch's drift report and shadow result, and their writes."""

    drift: DriftReport | None = None
    shadow: ShadowScore | None = None
    writers: list[Writer] = field(default_factory=list)


@dataclass
class Watch:
    """What a batch reads before scoring to observe it: the drift counts of the active
    version and the challenger with its entities' states."""

    model: LoadedModel
    drift: DriftState | None
    challenger: LoadedModel | None = None
    #: Reads the challenger's entities and states (a window monitor's), when it scores.
    stream: Callable[[], StreamContext | None] | None = None

    def observe(self, window: Window, scored: Scored | None, flagged: list[dict[str, Any]],
                generation: int, now: dt.datetime) -> Observation:
        """The batch's drift and shadow result, with the writes of both (``scored``:
        ``None`` when every row of the window was quarantined)."""
        seen = Observation()
        version = self.model.version
        reference = version.validation.get("reference")
        if self.drift is not None and reference is not None and scored is not None:
            self.drift.add(reference, window.values, version.features, scored.scores,
                           len(flagged))
            seen.drift = self.drift.report(reference, self.model.expected_ratio())
            seen.writers.append(drift_writer(version.monitor, self.drift, seen.drift, now))
        challenger = self.challenger
        if challenger is None:
            return seen
        if scored is None:  # its quarantined rows count for its gates too
            seen.shadow = ShadowScore(challenger.version.version, 0, 0, 0, 0, 0, {}, 0.0)
        else:
            try:
                stream = self.stream() if self.stream is not None else None
                seen.shadow = score_shadow(challenger, window, stream, flagged,
                                           active_tail(self.model, scored.scores),
                                           agreement_tail(self.model.expected_ratio()),
                                           now)
            except Exception:  # never the active version's batch
                log.warning("monitor %s: challenger version %d failed to score a batch in "
                            "shadow; skipped", version.monitor, challenger.version.version,
                            exc_info=True)
                return seen
            states = state_writer(challenger, stream, now)
            if states is not None:
                seen.writers.append(states)
        seen.writers.append(shadow_writer(version.monitor, version.version, generation,
                                          window, seen.shadow, now))
        return seen


def _compatible(monitor: MonitorSettings, active: LoadedModel, challenger: LoadedModel
                ) -> str | None:
    """Why ``challenger`` cannot score the active version's windows, if it cannot."""
    if list(challenger.version.features) != list(active.version.features):
        return (f"it reads features {challenger.version.features}, the active version "
                f"{active.version.features}")
    try:
        check_features(monitor, challenger.version)
    except ValueError as exc:
        return str(exc)
    return None


#: Challengers already warned about, by (monitor, version): the warning is given once.
_warned: set[tuple[str, int]] = set()


def watch_batch(connection: sa.Connection, monitor: MonitorSettings, source: SourceTable,
                models: ModelCache, model: LoadedModel, window: Window) -> Watch:
    """Read what observing this batch needs (one row of ``am_drift``, the challenger)."""
    drift = read_drift(connection, monitor.name, model.version.version) \
        if model.version.validation.get("reference") else None
    watch = Watch(model, drift)
    try:
        challenger = models.shadow(connection, monitor.name)
    except Exception as exc:  # a bad artifact: reported, the batch goes on
        challenger, why = None, str(exc)
    else:
        why = _compatible(monitor, model, challenger) if challenger is not None else None
    if why is not None:
        key = (monitor.name, shadow_version(connection, monitor.name) or 0)
        if key not in _warned:
            _warned.add(key)
            log.warning("monitor %s: the challenger cannot score in shadow: %s",
                        monitor.name, why)
        return watch
    if challenger is not None:
        watch.challenger = challenger
        if challenger.window is not None:  # read on a connection of its own, guarded
            engine = connection.engine

            def stream() -> StreamContext | None:
                with engine.connect() as own:
                    return stream_context(own, source, challenger, window)

            watch.stream = stream
    return watch
