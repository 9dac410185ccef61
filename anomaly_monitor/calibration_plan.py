"""``calibrate``: the thresholds a stored version could use, measured before one is set.

A plan scores the version's held-out rows (stored with it), re-reads their labels
when the monitor has a label column (else takes the flags operators labelled with
``anomaly-monitor label``), and scores the newest rows the version has not seen
(those after its training window), then lists the candidate thresholds with what
each would flag.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.calibration import RATE_METHODS, Threshold, calibrate, fit_robust
from anomaly_monitor.config import ConfigError, MonitorSettings, ThresholdSettings
from anomaly_monitor.feedback import labelled_flags
from anomaly_monitor.lifecycle import (
    calibrate_noting_fallback,
    choose_threshold,
    entity_tail_threshold,
    known_labels,
    method_label,
    rows_per_day,
)
from anomaly_monitor.reading.values import Window
from anomaly_monitor.reading.windows import read_window
from anomaly_monitor.registry import (
    LoadedModel,
    ModelVersion,
    RegistryError,
    active_version,
    calibration_scores,
    load_model,
    set_threshold,
)
from anomaly_monitor.source import read_ids, read_training, reflect_source

#: The newest rows after the version's training window scored by ``calibrate``.
DRY_RUN_RECENT_ROWS = 10_000
#: Target false-positive rates of the dry run's candidates, beside the configured one.
DRY_RUN_RATES = (0.01, 0.001, 0.0001)

#: Scores and 0/1 labels (NaN: unknown) of the held-out rows.
Labelled = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


@dataclass
class Candidate:
    """A threshold and what it would flag.

    ``precision``, ``recall`` and ``f1`` are measured on the labelled rows: the
    held-out rows when the monitor has a label column, else the flags operators
    labelled (recall then counts the labelled true positives only: rows no threshold
    flagged were never labelled); ``None`` without labels, and precision (recall, F1)
    also when the threshold flags no row (no row is labelled anomalous).
    """

    label: str
    threshold: Threshold
    holdout_rate: float = 0.0
    recent_flagged: int = 0
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None


@dataclass
class CalibrationPlan:
    """Everything ``calibrate`` shows: the chosen threshold and the alternatives."""

    version: ModelVersion
    chosen: Threshold
    candidates: list[Candidate]
    holdout_scores: npt.NDArray[np.float64]
    recent_scores: npt.NDArray[np.float64]
    #: First and last id of the recent rows (after the training window); ``None``: none yet.
    recent_ids: tuple[int, int] | None = None
    #: Rows with a known label, and how many of them are labelled anomalies.
    labelled_rows: int = 0
    labelled_anomalies: int = 0
    #: The share of held-out rows the ``robust`` fit puts above the bulk of normal scores.
    contamination: float | None = None
    #: The labelled rows' scores and labels: the held-out rows re-read with the label
    #: column, or else the flags operators labelled; ``None`` without either.
    labelled: Labelled | None = None
    #: Where the labels came from: ``"label column"``, ``"feedback"`` or ``None``.
    labels_from: str | None = None


def _recent_scores(
    connection: sa.Connection, monitor: MonitorSettings, model: LoadedModel, rows: int
) -> tuple[npt.NDArray[np.float64], tuple[int, int] | None]:
    """Scores of the newest ``rows`` rows after the version's training window (rows
    the model has not seen), with their first and last id (``None``: no such rows)."""
    last_trained = int(model.version.training["last_id"])
    if rows <= 0 or model.window is not None:  # a stream's rows score only in order
        return np.zeros(0), None
    source = reflect_source(connection, monitor)
    start = connection.execute(
        sa.select(source.id_column).where(source.id_column > last_trained)
        .order_by(source.id_column.desc()).offset(rows - 1).limit(1)
    ).scalar()
    after = last_trained if start is None else int(start) - 1
    window: Window = read_window(connection, source, after, rows,
                                 features=model.version.features)
    if not window.ids.size:
        return np.zeros(0), None
    ids = (int(window.ids.min()), int(window.ids.max()))
    return model.detector.decision_function(window.values), ids


def _holdout_labels(
    connection: sa.Connection, monitor: MonitorSettings, model: LoadedModel
) -> Labelled | None:
    """Scores and labels of the held-out rows, re-read; ``None`` without a label column."""
    if monitor.label_column is None or model.window is not None:
        return None
    source = reflect_source(connection, monitor)
    training = model.version.training
    first, last = training["holdout_first_id"], training["last_id"]
    values, labels = [], []
    for page in read_training(connection, source, id_range=(first, last), with_label=True):
        values.append(page.values)
        labels.append(page.labels if page.labels is not None else np.zeros(len(page.ids)))
    if not values or not sum(len(v) for v in values):
        return None
    matrix = np.concatenate(values)
    return model.detector.decision_function(matrix), np.concatenate(labels)


def _feedback_labels(
    connection: sa.Connection, monitor: MonitorSettings, model: LoadedModel
) -> Labelled | None:
    """Scores under ``model`` and operator labels (``am_feedback``) of the labelled flags
    of the current cursor generation; ``None`` without any. A row monitor's flags are
    re-read and re-scored (a flag of any version counts; rows deleted since are left
    out); a window monitor's rows score only in order with their entities' states, so
    only the flags this version scored count, with their stored scores."""
    flags = labelled_flags(connection, monitor.name)
    if not flags.source_ids.size:
        return None
    if model.window is not None:
        mine = flags.versions == model.version.version
        scores, truth = flags.scores[mine], flags.positive[mine]
    else:
        source = reflect_source(connection, monitor)
        window = read_ids(connection, source, flags.source_ids.tolist(),
                          features=model.version.features)
        if not window.ids.size:
            return None
        scores = model.detector.decision_function(window.values)
        truth = flags.positive[np.searchsorted(flags.source_ids, window.ids)]
    if not scores.size:
        return None
    return np.asarray(scores, dtype=np.float64), truth.astype(np.float64)


def plan_calibration(
    engine: sa.Engine,
    monitor: MonitorSettings,
    settings: ThresholdSettings,
    *,
    version: int | None = None,
    recent_rows: int = DRY_RUN_RECENT_ROWS,
) -> CalibrationPlan:
    """The threshold ``settings`` gives for ``version`` (default: the active one), and
    the alternatives.

    Each candidate is measured on the held-out rows (flag rate; precision, recall
    and F1 when the monitor has a label column) and on up to ``recent_rows`` of the
    newest rows after the version's training window.
    """
    with engine.connect() as connection:
        number = active_version(connection, monitor.name) if version is None else version
        if number is None:
            raise RegistryError(
                f"monitor {monitor.name!r} has no active model; run: "
                f"anomaly-monitor train {monitor.name} (or pass --version)"
            )
        model = load_model(connection, monitor.name, number, device="cpu")
        holdout = calibration_scores(connection, monitor.name, number)
        recent, recent_ids = _recent_scores(connection, monitor, model, recent_rows)
        labelled = _holdout_labels(connection, monitor, model)
        labels_from = None if labelled is None else "label column"
        if labelled is None:  # no label column (or a window monitor's): the feedback
            labelled = _feedback_labels(connection, monitor, model)
            labels_from = None if labelled is None else "feedback"
    if settings.method == "labels":
        _check_labels(monitor, model, labelled, labels_from)
    from_feedback = labels_from == "feedback"
    chosen = _chosen_threshold(model.version, holdout, labelled, settings,
                               per_entity=model.window is not None, from_feedback=from_feedback)
    candidates = [*_candidates(model.version, holdout, labelled, settings.target_fpr,
                               per_entity=model.window is not None,
                               from_feedback=from_feedback),
                  Candidate(f"chosen: {method_label(chosen)}", chosen)]
    for candidate in candidates:
        _measure(candidate, holdout, recent, labelled)
    truth = None if labelled is None else known_labels(*labelled)[1]
    fit = fit_robust(holdout) if holdout.size else None
    return CalibrationPlan(
        model.version, chosen, candidates, holdout, recent, recent_ids=recent_ids,
        labelled_rows=0 if truth is None else int(truth.size),
        labelled_anomalies=0 if truth is None else int(truth.sum()),
        contamination=None if fit is None else fit.contamination, labelled=labelled,
        labels_from=labels_from,
    )


def _check_labels(monitor: MonitorSettings, model: LoadedModel, labelled: Labelled | None,
                  labels_from: str | None) -> None:
    """Refuse ``--method labels`` without a labelled anomaly to maximise F1 on."""
    if labelled is not None and known_labels(*labelled)[1].any():
        return
    if labels_from == "label column":
        raise ConfigError(f"--method labels: no held-out row of monitor {monitor.name!r} "
                          f"has {monitor.label_column} = 1 (an anomaly)")
    scope = (f" that version {model.version.version} flagged" if model.window is not None
             else "")
    raise ConfigError(
        f"--method labels: monitor {monitor.name!r} has no labelled row to calibrate on "
        f"(no label column, or a window monitor) and no flag{scope} labelled a true "
        f"positive; label some with: anomaly-monitor label {monitor.name} "
        "SOURCE_ID... --tp (and false alarms --fp)")


def _by_labels(version: ModelVersion, labelled: Labelled, *, from_feedback: bool) -> Threshold:
    """The threshold of best F1 on the labelled rows. From feedback, never below the
    version's threshold: only flagged rows were labelled, so no normal row below it
    speaks against a lower one (feedback raises a threshold above false alarms)."""
    known_scores, truth = known_labels(*labelled)
    threshold = calibrate(known_scores, "labels", labels=truth.astype(int))
    if from_feedback and threshold.value < version.threshold:
        return Threshold(version.threshold, "labels",
                         {**threshold.params, "floor": "the version's threshold (labels "
                          "from feedback cover flagged rows only)"},
                         float((known_scores > version.threshold).mean()))
    return threshold


def _chosen_threshold(
    version: ModelVersion, holdout: npt.NDArray[np.float64], labelled: Labelled | None,
    settings: ThresholdSettings, *, per_entity: bool = False, from_feedback: bool = False,
) -> Threshold:
    """The threshold ``settings`` asks for; ``labels`` uses the labelled rows."""
    if settings.method == "labels" and labelled is not None:
        return _by_labels(version, labelled, from_feedback=from_feedback)
    training = version.training
    rate = rows_per_day(training["rows"] + training["holdout_rows"],
                        _parse_iso(training.get("first_timestamp")),
                        _parse_iso(training.get("last_timestamp")))
    return choose_threshold(holdout, settings, rows_per_day=rate, per_entity=per_entity)


def _parse_iso(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _candidates(
    version: ModelVersion, holdout: npt.NDArray[np.float64], labelled: Labelled | None,
    target_fpr: float, *, per_entity: bool = False, from_feedback: bool = False,
) -> list[Candidate]:
    """The current threshold, each rate method at a few rates, and max-F1 given labels."""
    candidates = [Candidate("current", Threshold(version.threshold, version.threshold_method))]
    for method in RATE_METHODS:
        for rate in sorted({target_fpr, *DRY_RUN_RATES}, reverse=True):
            threshold = (entity_tail_threshold(holdout, rate) if per_entity and
                         method == "robust" else
                         calibrate_noting_fallback(holdout, method, rate, None))
            candidates.append(Candidate(method_label(threshold, f" fpr={rate:g}"), threshold))
    if labelled is not None and known_labels(*labelled)[1].any():
        candidates.append(Candidate("labels (max F1)",
                                    _by_labels(version, labelled, from_feedback=from_feedback)))
    return candidates


def _measure(
    candidate: Candidate, holdout: npt.NDArray[np.float64], recent: npt.NDArray[np.float64],
    labelled: Labelled | None,
) -> None:
    """Fill in what ``candidate`` flags: held-out rate, recent rows, label metrics."""
    value = candidate.threshold.value
    candidate.holdout_rate = float((holdout > value).mean()) if holdout.size else 0.0
    candidate.recent_flagged = int((recent > value).sum())
    if labelled is None:
        return
    known_scores, truth = known_labels(*labelled)
    flagged = known_scores > value
    hits, n_flagged, positives = int((truth & flagged).sum()), int(flagged.sum()), int(truth.sum())
    candidate.precision = hits / n_flagged if n_flagged else None
    candidate.recall = hits / positives if positives else None
    candidate.f1 = 2.0 * hits / (n_flagged + positives) if positives else None


def apply_calibration(engine: sa.Engine, monitor: MonitorSettings, plan: CalibrationPlan) -> str:
    """Store the plan's chosen threshold on its version (used from the next batch on
    when it is active); returns the version's status. Refused when the version's
    threshold or status changed since the plan was made (checked in the update)."""
    number = plan.version.version
    with engine.begin() as connection:
        set_threshold(connection, monitor.name, number, plan.chosen,
                      replacing=plan.version.threshold, status=plan.version.status)
    return plan.version.status
