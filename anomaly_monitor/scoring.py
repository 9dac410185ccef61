"""Scoring a window with a model: flagged rows, severities, top features. No SQL.

Also the id arithmetic of gaps (ids a window skipped that may still commit).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from anomaly_monitor.calibration import SEVERITY_DECADES
from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.reading.values import Window
from anomaly_monitor.registry import LoadedModel, ModelVersion
from anomaly_monitor.source import SchemaError
from anomaly_monitor.windows import (
    EntityState,
    build_inputs,
    calibrate_scores,
    model_term,
    score_terms,
)

#: Feature contributions stored with each flagged row.
TOP_FEATURES = 3


def _describe(window: dict[str, Any] | None) -> str:
    if window is None:
        return "a row monitor (no [monitor.window])"
    return (f"a window monitor (size {window['size']}, derived {window['derived']}, "
            f"baseline_half_life {window['half_life']:g}, entity_column "
            f"{window['entity_column']!r})")


def check_features(monitor: MonitorSettings, version: ModelVersion) -> None:
    """Refuse a model trained on other features than the monitor's configured list, or
    as another kind of monitor (a window monitor, or one with another window or
    entity column, than the config now says)."""
    trained = version.training.get("window") or None
    wanted = None if monitor.window is None else {
        "size": monitor.window.size, "derived": sorted(monitor.window.derived),
        "half_life": monitor.window.baseline_half_life, "entity_column": monitor.entity_column}
    if (trained is None) != (wanted is None) or (
            trained is not None and wanted is not None
            and any((sorted(trained.get(key) or []) if key == "derived" else trained.get(key))
                    != value for key, value in wanted.items())):
        raise SchemaError(
            f"monitor {monitor.name!r}: active model version {version.version} was trained "
            f"as {_describe(trained)}, but the config now describes {_describe(wanted)}; "
            f"retrain with: anomaly-monitor train {monitor.name}")
    if monitor.features is not None and list(monitor.features) != list(version.features):
        raise SchemaError(
            f"monitor {monitor.name!r}: active model version {version.version} was "
            f"trained on features {version.features}, but the config lists "
            f"{list(monitor.features)}; retrain with: anomaly-monitor train {monitor.name}"
        )


def _contributions(
    model: LoadedModel, values: npt.NDArray[np.float64], scores: npt.NDArray[np.float64],
    names: list[str], *, raw_scores: bool = False,
) -> list[list[dict[str, Any]]]:
    """The top features of each row: name, share of the score, value. A window
    monitor's names carry the lag (``cpu[t-3]``), its values are scaled by the entity's
    baseline, and shares are of the model's raw score (its score is calibrated)."""
    if len(values) == 0:
        return []
    shares = model.detector.feature_errors(values)
    if raw_scores:
        scores = shares.sum(axis=1)
    top = np.argsort(-shares, axis=1, kind="stable")[:, :TOP_FEATURES]
    return [
        [{"feature": names[j], "share": round(float(shares[i, j] / scores[i]), 4)
          if scores[i] > 0 else 0.0, "value": float(values[i, j])} for j in top[i]]
        for i in range(len(values))
    ]


@dataclass
class StreamContext:
    """What a window monitor's rows are scored with: each row's entity key (in
    ``window.ids`` order) and the entities' states before the window. Scoring moves the
    states of the entities whose rows it scored in order (``moved``); rows with a
    context are scored out of order, without moving their entity's state."""

    entities: list[str]
    states: dict[str, EntityState]
    #: Windows read from the source for rows scored out of order (late rows, rows their
    #: entity's state learned already), by row index: they replace the entity's stored
    #: last samples.
    contexts: dict[int, npt.NDArray[np.float64]] = field(default_factory=dict)
    #: Which rows' entities were still learning their calibration (scored 0, never
    #: flagged), set by scoring.
    learning_rows: npt.NDArray[np.bool_] = field(
        default_factory=lambda: np.zeros(0, dtype=bool))
    #: The entities that had a state before scoring.
    states_before: frozenset[str] = field(init=False, default=frozenset())
    #: The entities whose states scoring moved (to be written with the batch).
    moved: set[str] = field(default_factory=set)

    @property
    def learning(self) -> int:
        """Rows scored while their entity was learning."""
        return int(self.learning_rows.sum())

    @property
    def new_entities(self) -> int:
        """Entities of the rows that had no state yet."""
        return len(set(self.entities) - set(self.states_before))

    def __post_init__(self) -> None:
        self.states_before = frozenset(self.states)


def _out_of_order(model: LoadedModel, values: npt.NDArray[np.float64], entities: list[str],
                  stream: StreamContext, rows: npt.NDArray[np.int64]
                  ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                             npt.NDArray[np.bool_]]:
    """Scores, inputs and learning flags of ``rows`` scored each with its own window
    (``stream.contexts``) and its entity's state, which does not move."""
    spec = model.window
    assert spec is not None
    parts = []
    for i in rows:
        state = stream.states.get(entities[i]) or EntityState.new(spec)
        if int(i) in stream.contexts:
            state = dataclasses.replace(state, tail=stream.contexts[int(i)])
        parts.append(build_inputs(values[i:i + 1], [""], {"": state}, spec))
    inputs = np.vstack([p.inputs for p in parts])
    raw = model_term(model.detector, inputs, spec)
    results = [calibrate_scores(score_terms(raw[k:k + 1], p), p, spec, update=False)
               for k, p in enumerate(parts)]
    return (np.concatenate([r[0] for r in results]), inputs,
            np.concatenate([r[1] for r in results]))


def _stream_scores(model: LoadedModel, window: Window, stream: StreamContext
                   ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The window monitor's scores of ``window`` and the model inputs. The rows with a
    context (late rows, and rows at or below their entity's ``last_id``: a cursor moved
    back, a version trained past the cursor) are scored out of order."""
    spec = model.window
    assert spec is not None
    n = len(window.ids)
    scores, learning = np.zeros(n), np.zeros(n, dtype=bool)
    inputs = np.zeros((n, len(spec.input_names())))
    seen = np.zeros(n, dtype=bool)
    seen[list(stream.contexts)] = True
    if seen.any():
        rows = np.flatnonzero(seen)
        scores[rows], inputs[rows], learning[rows] = _out_of_order(
            model, window.values, stream.entities, stream, rows)
    fresh = np.flatnonzero(~seen)
    if fresh.size:
        keys = [stream.entities[i] for i in fresh]
        built = build_inputs(window.values[fresh], keys, stream.states, spec)
        terms = score_terms(model_term(model.detector, built.inputs, spec), built)
        scores[fresh], learning[fresh] = calibrate_scores(terms, built, spec)
        inputs[fresh] = built.inputs
        for key, rows in built.groups.items():
            built.states[key].last_id = int(window.ids[fresh[rows[-1]]])
        stream.states = {**stream.states, **built.states}
        stream.moved = set(built.states)
    stream.learning_rows = learning
    return scores, inputs


@dataclass(frozen=True)
class Scored:
    """The scores of a window's rows (higher: more anomalous) and the model inputs
    they came from, with the inputs' names."""

    scores: npt.NDArray[np.float64]
    inputs: npt.NDArray[np.float64]
    names: Sequence[str]


def score_rows(model: LoadedModel, window: Window,
               stream: StreamContext | None = None) -> Scored:
    """Score every row of ``window`` (a window monitor's ``stream`` states move)."""
    if model.window is not None:
        if stream is None:
            raise ValueError("a window monitor's rows are scored with their entities' states")
        scores, inputs = _stream_scores(model, window, stream)
        return Scored(scores, inputs, model.window.input_names())
    return Scored(model.detector.decision_function(window.values), window.values,
                  model.version.features)


def score_window(
    monitor: str, model: LoadedModel, window: Window, scored_at: dt.datetime,
    stream: StreamContext | None = None,
) -> tuple[list[dict[str, Any]], npt.NDArray[np.float64]]:
    """The rows of ``window`` the model flags, as ``am_anomalies`` rows, and their
    severities (quarantined rows are not in ``window.values``). A window monitor's
    model needs ``stream`` (its rows' entities and states)."""
    if len(window.ids) == 0:
        return [], np.zeros(0)
    return flag_rows(monitor, model, window, scored_at, stream,
                     score_rows(model, window, stream))


def flag_rows(
    monitor: str, model: LoadedModel, window: Window, scored_at: dt.datetime,
    stream: StreamContext | None, scored: Scored, threshold: float | None = None,
) -> tuple[list[dict[str, Any]], npt.NDArray[np.float64]]:
    """The rows of ``window`` whose ``scored`` score passes ``threshold`` (default: the
    version's), as ``am_anomalies`` rows, and their severities."""
    scores, inputs, names = scored.scores, scored.inputs, scored.names
    threshold = model.version.threshold if threshold is None else threshold
    above = scores > threshold
    if stream is not None and model.window is not None:
        above &= ~stream.learning_rows  # whatever the threshold
    flagged = np.flatnonzero(above)
    if model.window is not None:  # the score is already -log10 of the tail probability
        severities = np.clip(100.0 * scores[flagged] / SEVERITY_DECADES, 0.0, 100.0)
    else:
        severities = model.severity.severity(scores[flagged])
    tops = _contributions(model, inputs[flagged], scores[flagged], names,
                          raw_scores=model.window is not None)
    rows = [
        {"monitor": monitor, "source_id": int(window.ids[i]),
         "source_timestamp": window.timestamp(i), "score": float(scores[i]),
         "threshold": threshold, "severity": float(severities[k]),
         "model_version": model.version.version, "contributions": tops[k],
         "scored_at": scored_at,
         "entity": stream.entities[i] if stream is not None and
         model.window is not None and model.window.entity_column is not None else None}
        for k, i in enumerate(flagged)
    ]
    return rows, severities


def gap_ranges(ids: npt.ArrayLike, after: int, last: int) -> list[list[int]]:
    """Inclusive id ranges in ``after+1 .. last`` that are not in ``ids``."""
    seen = np.asarray(ids, dtype=np.int64)
    if len(seen) == last - after and len(seen) and seen[0] == after + 1 and \
            seen[-1] == last and bool((np.diff(seen) == 1).all()):
        return []  # the common case, a contiguous window: no sort needed
    seen = np.unique(seen)
    edges = np.concatenate([[after], seen[(seen > after) & (seen <= last)], [last + 1]])
    holes = np.flatnonzero(np.diff(edges) > 1)
    return [[int(edges[i] + 1), int(edges[i + 1] - 1)] for i in holes]


def subtract_ids(ranges: list[list[int]], found: npt.ArrayLike) -> list[list[int]]:
    """``ranges`` without the ids in ``found``."""
    found_ids = np.unique(np.asarray(found, dtype=np.int64))
    left: list[list[int]] = []
    for a, b in ranges:
        inside = found_ids[(found_ids >= a) & (found_ids <= b)]
        left += gap_ranges(inside, a - 1, b) if inside.size else [[a, b]]
    return left
