"""Model lifecycle operations behind the CLI: train, calibrate, activate, roll back.

Training streams the source table in keyset pages, holds out the newest rows for
calibration, stores a candidate version and (by default) activates it.
Calibration recomputes a version's threshold from its stored held-out scores.
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.calibration import (
    RATE_METHODS,
    CalibrationWarning,
    FewScoresWarning,
    Threshold,
    calibrate,
    fit_robust,
    fpr_for_alerts_per_day,
)
from anomaly_monitor.config import MonitorSettings, ThresholdSettings
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.reading.values import Window
from anomaly_monitor.reading.windows import read_window
from anomaly_monitor.registry import (
    LoadedModel,
    ModelVersion,
    RegistryError,
    activate,
    active_version,
    calibration_scores,
    load_model,
    rollback_target,
    set_threshold,
    store_version,
)
from anomaly_monitor.scoring import check_features
from anomaly_monitor.source import (
    SchemaError,
    SourceTable,
    newest_id,
    read_training,
    reflect_source,
)

#: Share of the training window (its newest rows) held out for calibration.
HOLDOUT_FRACTION = 0.2
#: The fewest usable rows a model is trained on.
MIN_TRAINING_ROWS = 50
#: Training reads at most this many rows unless --limit says otherwise (bounded memory).
DEFAULT_TRAINING_LIMIT = 1_000_000
#: Rows before the cursor scored by ``calibrate --dry-run``.
DRY_RUN_RECENT_ROWS = 10_000
#: Target false-positive rates of the dry run's candidates, beside the configured one.
DRY_RUN_RATES = (0.01, 0.001, 0.0001)
SECONDS_PER_DAY = 86_400.0
#: Storing a trained version is tried this many times when another ``train`` of the
#: same monitor took the next version number at the same moment.
STORE_ATTEMPTS = 5


class TrainingError(ValueError):
    """The training window is empty or unusable."""


@dataclass
class TrainingData:
    """The usable rows of a training window, oldest first."""

    values: npt.NDArray[np.float32]
    ids: npt.NDArray[np.int64]
    labels: npt.NDArray[np.float64] | None
    skipped: int
    first_timestamp: dt.datetime | None
    last_timestamp: dt.datetime | None


def collect_training(
    connection: sa.Connection,
    source: SourceTable,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int | None,
) -> TrainingData:
    """Read the training window page by page, keeping only the matrix (float32)."""
    values, ids, labels, skipped = [], [], [], 0
    first = last = None
    with_label = source.label_column is not None
    for page in read_training(connection, source, since=since, until=until,
                              limit=limit or DEFAULT_TRAINING_LIMIT, with_label=with_label):
        values.append(page.values.astype(np.float32))
        ids.append(page.ids)
        if page.labels is not None:
            labels.append(page.labels)
        skipped += len(page.bad)
        stamps = [t for t in page.span() if t is not None]  # rows are in id order
        if stamps:
            first = min(stamps) if first is None else min(first, *stamps)
            last = max(stamps) if last is None else max(last, *stamps)
    n_features = len(source.features)
    return TrainingData(
        np.concatenate(values) if values else np.zeros((0, n_features), np.float32),
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate(labels) if with_label and labels else None,
        skipped, first, last,
    )


def rows_per_day(rows: int, first: dt.datetime | None, last: dt.datetime | None) -> float | None:
    """The row rate of a training window, ``None`` without a time span."""
    if first is None or last is None:
        return None
    span = (last - first).total_seconds()
    return rows / span * SECONDS_PER_DAY if span > 0 else None


def known_labels(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The scores of the rows with a known label (not NaN) and whether each is an
    anomaly (label above 0.5): the one reading of a label column."""
    known = ~np.isnan(labels)
    return scores[known], labels[known] > 0.5


def choose_threshold(
    scores: npt.NDArray[np.float64],
    settings: ThresholdSettings,
    *,
    labels: npt.NDArray[np.float64] | None = None,
    rows_per_day: float | None = None,
) -> Threshold:
    """The threshold that ``settings`` asks for over held-out ``scores``."""
    target = settings.target_fpr
    if settings.alerts_per_day is not None and settings.method in RATE_METHODS:
        if rows_per_day is None:
            raise TrainingError("alerts_per_day needs timestamps spanning more than an instant")
        target = fpr_for_alerts_per_day(settings.alerts_per_day, rows_per_day)
    if settings.method == "labels":
        if labels is None:
            raise TrainingError("threshold method 'labels' needs label_column in the monitor")
        known_scores, truth = known_labels(scores, labels)
        threshold = calibrate(known_scores, "labels", labels=truth.astype(int))
    else:
        threshold = _calibrate_noting_fallback(scores, settings.method, target, settings.value)
    if settings.alerts_per_day is not None:
        threshold.params["alerts_per_day"] = settings.alerts_per_day
    return threshold


def method_label(threshold: Threshold, rate: str = "") -> str:
    """How a threshold's method is named everywhere (rows, result, plot): ``pot fpr=0.01
    (as quantile)`` when POT fell back, ``quantile ... (held-out maximum)``."""
    note = ""
    if "fallback" in threshold.params:
        note = " (held-out maximum)" if threshold.method == "quantile" else " (as quantile)"
    return f"{threshold.method}{rate}{note}"


def _calibrate_noting_fallback(
    scores: npt.NDArray[np.float64], method: str, target_fpr: float, value: float | None
) -> Threshold:
    """``calibrate`` with a fallback (POT, robust) recorded in ``params["fallback"]`` and a
    threshold resting on few rows in ``params["warning"]``, not warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        threshold = calibrate(scores, method, target_fpr=target_fpr, value=value)
    for w in caught:
        if issubclass(w.category, CalibrationWarning):
            key = "warning" if issubclass(w.category, FewScoresWarning) else "fallback"
            threshold.params.setdefault(key, str(w.message))
    return threshold


def _auroc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.float64]) -> float | None:
    from scipy.stats import rankdata

    known_scores, truth = known_labels(scores, labels)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(known_scores)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@dataclass
class TrainReport:
    """What ``train`` did."""

    version: ModelVersion
    rows: int
    skipped: int
    seconds: float
    activated: bool


def train_monitor(
    engine: sa.Engine,
    monitor: MonitorSettings,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int | None = None,
    epochs: int | None = None,
    device: str = "auto",
    activate_version: bool = True,
    verbose: bool = False,
) -> TrainReport:
    """Train a new version of ``monitor`` on its source table and store it."""
    import pandas as pd

    from anomaly_monitor.detectors.estimator import AutoencoderDetector

    started = time.perf_counter()
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
        data = collect_training(connection, source, since=since, until=until, limit=limit)
    if len(data.ids) < MIN_TRAINING_ROWS:
        raise TrainingError(
            f"monitor {monitor.name!r}: the training window of table {monitor.table!r} has "
            f"{len(data.ids)} usable rows ({data.skipped} skipped for NULL/NaN/non-numeric "
            f"values); at least {MIN_TRAINING_ROWS} are needed"
        )
    n_fit = round(len(data.ids) * (1 - HOLDOUT_FRACTION))
    params: dict[str, Any] = {"random_state": 0, **monitor.model}
    if epochs is not None:
        params["epochs"] = epochs
    detector = AutoencoderDetector(monitor.kind, device=device, verbose=verbose, **params)
    frame = pd.DataFrame(data.values[:n_fit], columns=list(source.features))
    detector.fit(frame)
    detector.verbose = False
    held_out = data.values[n_fit:]
    scores = detector.decision_function(held_out)
    labels = data.labels[n_fit:] if data.labels is not None else None
    threshold = choose_threshold(scores, monitor.threshold, labels=labels,
                                 rows_per_day=rows_per_day(len(data.ids), data.first_timestamp,
                                                           data.last_timestamp))
    training = {
        "rows": n_fit, "holdout_rows": len(scores), "skipped_rows": data.skipped,
        "first_id": int(data.ids[0]), "last_id": int(data.ids[-1]),
        "holdout_first_id": int(data.ids[n_fit]),
        "first_timestamp": _iso(data.first_timestamp), "last_timestamp": _iso(data.last_timestamp),
        "since": _iso(since), "until": _iso(until), "device": str(detector.device_),
        "epochs_run": [len(h.train_loss) for h in detector.history_],
        "architecture": {"hidden_dims": [int(h) for h in detector.hidden_dims_],
                         "latent_dim": int(detector.latent_dim_)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    validation = {
        "holdout_flag_rate": threshold.calibration_flag_rate,
        "score_quantiles": {q: float(np.quantile(scores, float(q)))
                            for q in ("0.5", "0.9", "0.99", "0.999")},
        "auroc": _auroc(scores, labels) if labels is not None else None,
    }
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            with engine.begin() as connection:
                version = store_version(connection, monitor.name, detector, threshold, scores,
                                        training=training, validation=validation)
                if activate_version:
                    version = activate_checked(connection, monitor, source, version.version)
            break
        except (sa.exc.IntegrityError, sa.exc.OperationalError) as exc:
            # Another train stored the number read as next (UNIQUE (monitor, version)),
            # or on SQLite committed after this transaction's snapshot: read it again.
            if not _raced(exc) or attempt == STORE_ATTEMPTS:
                raise
    return TrainReport(version, int(n_fit), data.skipped, time.perf_counter() - started,
                       activate_version)


def _raced(exc: sa.exc.DBAPIError) -> bool:
    """Whether storing a version failed because another train stored one meanwhile."""
    message = str(exc.orig).lower()
    return ("unique" in message or "duplicate key" in message) if isinstance(
        exc, sa.exc.IntegrityError) else "database is locked" in message


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_iso(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def activate_checked(
    connection: sa.Connection, monitor: MonitorSettings, source: SourceTable | None,
    version: int, *, action: str = "activate",
) -> ModelVersion:
    """Activate ``version`` after checking that the source still has its features."""
    source = source or reflect_source(connection, monitor)

    def verify(loaded: LoadedModel) -> None:
        missing = [f for f in loaded.version.features if f not in source.table.c]
        if missing:
            raise SchemaError(
                f"model version {version} of monitor {monitor.name!r} was trained on features "
                f"{loaded.version.features}, but table {monitor.table!r} lacks "
                f"{', '.join(missing)}"
            )
        source.feature_columns(loaded.version.features)
        check_features(monitor, loaded.version)

    return activate(connection, monitor.name, version,
                    initial_position=lambda: newest_id(connection, source), verify=verify,
                    action=action)


def rollback(connection: sa.Connection, monitor: MonitorSettings) -> ModelVersion:
    """Re-activate the version that was active before the current one (the activation
    history, ``am_activations``, records it as a rollback)."""
    return activate_checked(connection, monitor, None, rollback_target(connection, monitor.name),
                            action="rollback")


# -- calibration ---------------------------------------------------------------------------

#: Scores and 0/1 labels (NaN: unknown) of the held-out rows.
Labelled = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


@dataclass
class Candidate:
    """A threshold and what it would flag.

    ``precision``, ``recall`` and ``f1`` are measured on the labelled held-out rows
    when the monitor has a label column; ``None`` without labels, and precision
    (recall, F1) also when the threshold flags no row (no row is labelled anomalous).
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
    #: Held-out rows with a known label, and how many of them are labelled anomalies.
    labelled_rows: int = 0
    labelled_anomalies: int = 0
    #: The share of held-out rows the ``robust`` fit puts above the bulk of normal scores.
    contamination: float | None = None


def _recent_scores(
    connection: sa.Connection, monitor: MonitorSettings, model: LoadedModel, rows: int
) -> npt.NDArray[np.float64]:
    """Scores of up to ``rows`` rows just before the cursor (recent batches)."""
    cursor = read_cursor(connection, monitor.name)
    if cursor is None or rows <= 0:
        return np.zeros(0)
    source = reflect_source(connection, monitor)
    start = connection.execute(
        sa.select(source.id_column).where(source.id_column <= cursor.position)
        .order_by(source.id_column.desc()).offset(rows - 1).limit(1)
    ).scalar()
    if start is None:  # fewer rows than asked for: start at the oldest
        start = connection.execute(sa.select(sa.func.min(source.id_column))).scalar()
    if start is None:
        return np.zeros(0)
    after = int(start) - 1
    window: Window = read_window(connection, source, after, rows,
                                 features=model.version.features)
    window_ids = window.ids <= cursor.position
    if not window_ids.any():
        return np.zeros(0)
    return model.detector.decision_function(window.values[window_ids])


def _holdout_labels(
    connection: sa.Connection, monitor: MonitorSettings, model: LoadedModel
) -> Labelled | None:
    """Scores and labels of the held-out rows, re-read; ``None`` without a label column."""
    if monitor.label_column is None:
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


def plan_calibration(
    engine: sa.Engine,
    monitor: MonitorSettings,
    settings: ThresholdSettings,
    *,
    recent_rows: int = DRY_RUN_RECENT_ROWS,
) -> CalibrationPlan:
    """The threshold ``settings`` gives for the active version, and the alternatives.

    Each candidate is measured on the held-out rows (flag rate; precision, recall
    and F1 when the monitor has a label column) and on the recent rows.
    """
    with engine.connect() as connection:
        number = active_version(connection, monitor.name)
        if number is None:
            raise RegistryError(
                f"monitor {monitor.name!r} has no active model; run: "
                f"anomaly-monitor train {monitor.name}"
            )
        holdout = calibration_scores(connection, monitor.name, number)
        model = load_model(connection, monitor.name, number, device="cpu")
        recent = _recent_scores(connection, monitor, model, recent_rows)
        labelled = _holdout_labels(connection, monitor, model)
    version = model.version
    chosen = _chosen_threshold(version, holdout, labelled, settings)
    candidates = [*_candidates(version, holdout, labelled, settings.target_fpr),
                  Candidate(f"chosen: {method_label(chosen)}", chosen)]
    for candidate in candidates:
        _measure(candidate, holdout, recent, labelled)
    truth = None if labelled is None else known_labels(*labelled)[1]
    fit = fit_robust(holdout) if holdout.size else None
    return CalibrationPlan(
        version, chosen, candidates, holdout, recent,
        labelled_rows=0 if truth is None else int(truth.size),
        labelled_anomalies=0 if truth is None else int(truth.sum()),
        contamination=None if fit is None else fit.contamination,
    )


def _chosen_threshold(
    version: ModelVersion, holdout: npt.NDArray[np.float64], labelled: Labelled | None,
    settings: ThresholdSettings,
) -> Threshold:
    """The threshold ``settings`` asks for; ``labels`` uses the re-read held-out labels."""
    if settings.method == "labels" and labelled is not None:
        return choose_threshold(labelled[0], settings, labels=labelled[1])
    training = version.training
    rate = rows_per_day(training["rows"] + training["holdout_rows"],
                        _parse_iso(training.get("first_timestamp")),
                        _parse_iso(training.get("last_timestamp")))
    return choose_threshold(holdout, settings, rows_per_day=rate)


def _candidates(
    version: ModelVersion, holdout: npt.NDArray[np.float64], labelled: Labelled | None,
    target_fpr: float,
) -> list[Candidate]:
    """The current threshold, each rate method at a few rates, and max-F1 given labels."""
    candidates = [Candidate("current", Threshold(version.threshold, version.threshold_method))]
    for method in RATE_METHODS:
        for rate in sorted({target_fpr, *DRY_RUN_RATES}, reverse=True):
            threshold = _calibrate_noting_fallback(holdout, method, rate, None)
            candidates.append(Candidate(method_label(threshold, f" fpr={rate:g}"), threshold))
    if labelled is not None:
        known_scores, truth = known_labels(*labelled)
        if truth.any():
            threshold = calibrate(known_scores, "labels", labels=truth.astype(int))
            candidates.append(Candidate("labels (max F1)", threshold))
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


def apply_calibration(engine: sa.Engine, monitor: MonitorSettings, plan: CalibrationPlan) -> None:
    """Store the plan's chosen threshold on its version (used from the next batch on)."""
    with engine.begin() as connection:
        if active_version(connection, monitor.name) != plan.version.version:
            raise RegistryError(
                f"monitor {monitor.name!r}: the active version changed during calibration; "
                "run calibrate again"
            )
        set_threshold(connection, monitor.name, plan.version.version, plan.chosen)


def plot_calibration(plan: CalibrationPlan, path: str) -> None:
    """Draw the held-out score histogram with the current and chosen thresholds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RegistryError(
            "--plot needs matplotlib: pip install 'anomaly-monitor[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    scores = plan.holdout_scores
    everything = np.concatenate([scores, plan.recent_scores,
                                 [plan.version.threshold, plan.chosen.value]])
    everything = everything[everything > 0]
    bins = (np.geomspace(max(everything.min(), 1e-6), max(everything.max() * 1.05, 1e-5), 80)
            if everything.size else 10)
    ax.hist(scores, bins=bins, alpha=0.7, label="held-out rows")
    if plan.recent_scores.size:
        ax.hist(plan.recent_scores, bins=bins, alpha=0.5, label="recent rows")
    ax.axvline(plan.version.threshold, color="grey", linestyle="--", label="current threshold")
    ax.axvline(plan.chosen.value, color="red", label=f"new threshold ({plan.chosen.method})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("rows")
    ax.set_title(f"monitor {plan.version.monitor}, model version {plan.version.version}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
