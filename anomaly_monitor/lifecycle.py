"""Model lifecycle operations behind the CLI: train, calibrate, activate, roll back.

Training streams the source table in keyset pages, holds out the newest rows for
calibration, stores a candidate version and (by default) activates it.
Calibration recomputes a version's threshold from its stored held-out scores.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import warnings
from collections.abc import Sequence
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
    fpr_for_alerts_per_day,
)
from anomaly_monitor.config import MonitorSettings, ThresholdSettings
from anomaly_monitor.cursors import Lease, fence
from anomaly_monitor.drift import drift_window_rows, reference_of
from anomaly_monitor.entities import row_entities, write_states
from anomaly_monitor.feedback import excluded_ids
from anomaly_monitor.incidents import sample_interval, stream_samples
from anomaly_monitor.registry import (
    LoadedModel,
    ModelVersion,
    RegistryError,
    activate,
    active_version,
    prune_artifacts,
    rollback_target,
    store_version,
)
from anomaly_monitor.scoring import check_features
from anomaly_monitor.source import (
    SchemaError,
    SourceTable,
    ids_stamped_within,
    newest_id,
    read_training,
    reflect_source,
)
from anomaly_monitor.stream_training import fit_stream, window_spec
from anomaly_monitor.suppression import spans_between, training_spans
from anomaly_monitor.tables import utcnow

log = logging.getLogger(__name__)

#: Share of the training window (its newest rows) held out for calibration.
HOLDOUT_FRACTION = 0.2
#: The fewest usable rows a model is trained on.
MIN_TRAINING_ROWS = 50
#: Training reads at most this many rows unless --limit says otherwise (bounded memory).
DEFAULT_TRAINING_LIMIT = 1_000_000
SECONDS_PER_DAY = 86_400.0
#: What ``train`` leaves out of its window by default: rows labelled true anomalies,
#: and rows in suppression windows marked ``skip_training``.
DEFAULT_EXCLUDE = ("labelled", "suppressed")
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

    def without(self, drop: npt.NDArray[np.bool_]) -> TrainingData:
        """The same window without the rows ``drop`` marks."""
        keep = ~drop
        return dataclasses.replace(
            self, values=self.values[keep], ids=self.ids[keep],
            labels=None if self.labels is None else self.labels[keep])


def collect_training(
    connection: sa.Connection,
    source: SourceTable,
    *,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int | None,
    up_to_id: int | None = None,
) -> TrainingData:
    """Read the training window page by page, keeping only the matrix (float32); with
    ``up_to_id``, only rows at or below that id (those already scored)."""
    values, ids, labels, skipped = [], [], [], 0
    first = last = None
    with_label = source.label_column is not None
    for page in read_training(connection, source, since=since, until=until,
                              limit=limit or DEFAULT_TRAINING_LIMIT, with_label=with_label,
                              id_range=(None, up_to_id)):
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


#: Training rows whose entities are read per query.
ENTITY_PAGE_ROWS = 100_000


def training_entities(connection: sa.Connection, source: SourceTable,
                      ids: npt.NDArray[np.int64]) -> list[str]:
    """The entity key of each training row (a page of ids per query)."""
    keys: list[str] = []
    for start in range(0, len(ids), ENTITY_PAGE_ROWS):
        keys += row_entities(connection, source, ids[start:start + ENTITY_PAGE_ROWS])[0]
    return keys


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
    per_entity: bool = False,
) -> Threshold:
    """The threshold that ``settings`` asks for over held-out ``scores``. With
    ``per_entity`` (a window monitor, whose scores are already each entity's
    ``-log10`` tail probability) ``robust`` is that tail probability itself."""
    target = settings.target_fpr
    if settings.alerts_per_day is not None and settings.method in RATE_METHODS:
        if rows_per_day is None:
            raise TrainingError("alerts_per_day needs timestamps spanning more than an instant")
        target = fpr_for_alerts_per_day(settings.alerts_per_day, rows_per_day)
    if settings.method == "robust" and per_entity:
        threshold = entity_tail_threshold(scores, target)
    elif settings.method == "labels":
        if labels is None:
            raise TrainingError("threshold method 'labels' needs label_column in the monitor")
        known_scores, truth = known_labels(scores, labels)
        threshold = calibrate(known_scores, "labels", labels=truth.astype(int))
    else:
        threshold = calibrate_noting_fallback(scores, settings.method, target, settings.value)
    if settings.alerts_per_day is not None:
        threshold.params["alerts_per_day"] = settings.alerts_per_day
    return threshold


def entity_tail_threshold(scores: npt.NDArray[np.float64], target_fpr: float) -> Threshold:
    """A window monitor's ``robust`` threshold: its scores are each entity's
    ``-log10`` tail probability, so a target rate is the threshold ``-log10(rate)``
    on every entity, without fitting the held-out scores."""
    value = -float(np.log10(target_fpr))
    return Threshold(value, "robust", {"target_fpr": target_fpr, "per_entity_tail": True},
                     float((scores > value).mean()) if scores.size else None)


def method_label(threshold: Threshold, rate: str = "") -> str:
    """How a threshold's method is named everywhere (rows, result, plot): ``pot fpr=0.01
    (as quantile)`` when POT fell back, ``quantile ... (held-out maximum)``."""
    note = ""
    if "fallback" in threshold.params:
        note = " (held-out maximum)" if threshold.method == "quantile" else " (as quantile)"
    return f"{threshold.method}{rate}{note}"


def calibrate_noting_fallback(
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


def _left_out(connection: sa.Connection, monitor: MonitorSettings, source: SourceTable,
              data: TrainingData, exclude: Sequence[str],
              ) -> tuple[npt.NDArray[np.bool_], dict[str, int]]:
    """Which training rows ``exclude`` leaves out: flags (``labelled``: those labelled
    true anomalies; ``flagged``: all) and rows stamped inside a suppression window with
    ``skip_training`` (``suppressed``); and how many for each reason."""
    counts: dict[str, int] = {}
    if not data.ids.size:
        return np.zeros(0, dtype=bool), counts
    first, last = int(data.ids[0]), int(data.ids[-1])
    drop = np.zeros(len(data.ids), dtype=bool)
    for reason in ("labelled", "flagged"):
        if reason in exclude:
            hit = np.isin(data.ids, excluded_ids(connection, monitor.name, first, last,
                                                 [reason]))
            counts[reason] = int(hit.sum())
            drop |= hit
    if "suppressed" in exclude and data.first_timestamp and data.last_timestamp:
        hit = np.zeros(len(data.ids), dtype=bool)
        spans = training_spans(spans_between(connection, monitor.name, monitor.suppress,
                                             data.first_timestamp, data.last_timestamp))
        for entity in {s.entity for s in spans}:
            ids = ids_stamped_within(connection, source, first, last,
                                     [(s.start, s.end) for s in spans if s.entity == entity])
            if entity is not None and ids.size:
                keys = row_entities(connection, source, ids)[0]
                ids = ids[np.array([k == entity for k in keys], dtype=bool)]
            hit |= np.isin(data.ids, ids)
        counts["suppressed"] = int(hit.sum())
        drop |= hit
    return drop, counts


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
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    up_to_id: int | None = None,
    lease: Lease | None = None,
    trigger: str = "manual",
) -> TrainReport:
    """Train a new version of ``monitor`` on its source table and store it, leaving
    ``exclude`` out of the training window (``labelled``: rows labelled true anomalies;
    ``flagged``: every flagged row; ``suppressed``: rows stamped inside a suppression
    window with ``skip_training``). A window monitor keeps those rows as the context
    of the rows after them: they are left out of the fit and the calibration only.

    Not activated, the version becomes the monitor's challenger (status ``shadow``,
    replacing an earlier one) when a version is active, else a ``candidate``. With
    ``lease`` (the daemon's retrain), it is stored only while that lease holds
    (:class:`BatchConflictError` otherwise). ``trigger`` is recorded (``manual``,
    ``schedule``, ``drift``); artifacts beyond ``monitor.keep_versions`` are pruned."""
    import pandas as pd

    from anomaly_monitor.detectors.estimator import AutoencoderDetector

    started = time.perf_counter()
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
        data = collect_training(connection, source, since=since, until=until, limit=limit,
                                up_to_id=up_to_id)
        drop, left_out = _left_out(connection, monitor, source, data, exclude)
    if monitor.window is None and drop.any():
        data = data.without(drop)
    if len(data.ids) < MIN_TRAINING_ROWS:
        why = ", ".join(f"{n} {reason}" for reason, n in left_out.items() if n)
        raise TrainingError(
            f"monitor {monitor.name!r}: the training window of table {monitor.table!r} has "
            f"{len(data.ids)} usable rows ({data.skipped} skipped for NULL/NaN/non-numeric "
            f"values{'; left out: ' + why if why else ''}); at least {MIN_TRAINING_ROWS} "
            "are needed"
        )
    n_fit = round(len(data.ids) * (1 - HOLDOUT_FRACTION))
    log.info("train %s: read %d rows of %s (%d skipped) in %.1f s; fitting %s on %d, "
             "calibrating on %d", monitor.name, len(data.ids), source.table.fullname,
             data.skipped, time.perf_counter() - started, monitor.kind, n_fit,
             len(data.ids) - n_fit)
    params: dict[str, Any] = {"random_state": 0, **monitor.model}
    if epochs is not None:
        params["epochs"] = epochs
    spec = window_spec(monitor, source.features) if monitor.window is not None else None
    if spec is not None and params.get("hidden_dims") is None:
        from anomaly_monitor.detectors.capacity import window_widths

        params["hidden_dims"] = list(window_widths(len(spec.input_names())))
    detector = AutoencoderDetector(monitor.kind, device=device, verbose=verbose, **params)
    labels = data.labels[n_fit:] if data.labels is not None else None
    stream = None
    if spec is not None:
        with engine.connect() as connection:
            keys = training_entities(connection, source, data.ids)
        stream = fit_stream(detector, data.values.astype(np.float64), keys, spec, n_fit,
                            data.ids, excluded=drop)
        scores = stream.held_out_scores
        labels = labels[stream.held_out_rows] if labels is not None else None
    else:
        detector.fit(pd.DataFrame(data.values[:n_fit], columns=list(source.features)))
        scores = detector.decision_function(data.values[n_fit:])
    detector.verbose = False
    threshold = choose_threshold(scores, monitor.threshold, labels=labels,
                                 rows_per_day=rows_per_day(len(data.ids), data.first_timestamp,
                                                           data.last_timestamp),
                                 per_entity=stream is not None)
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
        "exclude": list(exclude), "excluded_rows": int(drop.sum()), "excluded": left_out,
        "trigger": trigger, "cuda_oom": detector.oom_counts().as_dict(),
    }
    if stream is not None:
        training.update(window=stream.spec.to_dict(), entities=len(stream.states),
                        fit_rows=stream.fit_rows)
    with engine.connect() as connection:
        samples = stream_samples(connection, source, int(data.ids[0]), int(data.ids[-1]),
                                 len(data.ids), training.get("entities"))
    training["sample_interval_seconds"] = sample_interval(samples, data.first_timestamp,
                                                          data.last_timestamp)
    validation = {
        **(_held_out_losses(engine, monitor, detector, data.values[n_fit:])
           if stream is None else {}),
        "holdout_flag_rate": threshold.calibration_flag_rate,
        "score_quantiles": {q: float(np.quantile(scores, float(q)))
                            for q in ("0.5", "0.9", "0.99", "0.999")},
        "auroc": _auroc(scores, labels) if labels is not None else None,
        "reference": reference_of(
            data.values[~drop] if monitor.window is not None else data.values,
            list(source.features), scores, window_rows=drift_window_rows(rows_per_day(
                len(data.ids), data.first_timestamp, data.last_timestamp))),
    }
    version, pruned = _store(engine, monitor, source, detector, threshold, scores, stream,
                             training=training, validation=validation, lease=lease,
                             activate_version=activate_version)
    log.info("train %s: stored version %d (%s), threshold %.6g (%s), %.0f s in all",
             monitor.name, version.version, version.status, threshold.value,
             threshold.method, time.perf_counter() - started)
    if pruned:
        log.info("train %s: removed the artifacts of version(s) %s (keep_versions = %d)",
                 monitor.name, ", ".join(map(str, pruned)), monitor.keep_versions)
    return TrainReport(version, int(n_fit), data.skipped, time.perf_counter() - started,
                       activate_version)


def _store(engine: sa.Engine, monitor: MonitorSettings, source: SourceTable, detector: Any,
           threshold: Threshold, scores: npt.NDArray[np.float64], stream: Any, *,
           training: dict[str, Any], validation: dict[str, Any], lease: Lease | None,
           activate_version: bool) -> tuple[ModelVersion, list[int]]:
    """Store a trained version in one transaction (fenced by ``lease``): as active, as
    the challenger, or as a candidate; its entity states; retention. The version, and
    the versions whose artifacts retention removed."""
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            with engine.begin() as connection:
                if lease is not None:
                    fence(connection, monitor.name, lease, utcnow())
                status = "candidate"
                if not activate_version and active_version(connection, monitor.name):
                    status = "shadow"
                    _supersede(connection, monitor.name)
                version = store_version(connection, monitor.name, detector, threshold, scores,
                                        training=training, validation=validation,
                                        features=list(source.features), status=status)
                if stream is not None:
                    write_states(connection, monitor.name, version.version, stream.states,
                                 version.created_at, trained=True)
                if activate_version:
                    version = activate_checked(connection, monitor, source, version.version)
                return version, prune_artifacts(connection, monitor.name,
                                                monitor.keep_versions)
        except (sa.exc.IntegrityError, sa.exc.OperationalError) as exc:
            # Another train stored the number read as next (UNIQUE (monitor, version)),
            # or on SQLite committed after this transaction's snapshot: read it again.
            if not _raced(exc) or attempt == STORE_ATTEMPTS:
                raise
    raise AssertionError("unreachable: the last attempt raises")


def _held_out_losses(engine: sa.Engine, monitor: MonitorSettings, detector: Any,
                     values: npt.NDArray[np.float32]) -> dict[str, Any]:
    """A row monitor's held-out loss, and the active version's on the same rows (what
    the ``validation_loss`` gate of a challenger compares)."""
    from anomaly_monitor.registry import load_model
    from anomaly_monitor.shadow import holdout_loss

    rows = values.astype(np.float64)
    found: dict[str, Any] = {"loss": holdout_loss(detector, rows)}
    with engine.connect() as connection:
        current = active_version(connection, monitor.name)
        try:
            active = load_model(connection, monitor.name, current, device="cpu") \
                if current is not None else None
        except RegistryError:  # e.g. its artifact was pruned: nothing to compare with
            active = None
    if active is not None and active.window is None and \
            list(active.version.features) == list(detector.feature_names_in_ or []):
        found["active_loss"] = {"version": current,
                                "loss": holdout_loss(active.detector, rows)}
    return found


def _supersede(connection: sa.Connection, monitor: str) -> None:
    """Reject the monitor's challenger, if any: a newer one replaces it."""
    from anomaly_monitor.shadow import reject, shadow_version

    old = shadow_version(connection, monitor)
    if old is not None:
        reject(connection, monitor, old, by="train", reason="superseded by a newer challenger")


def _raced(exc: sa.exc.DBAPIError) -> bool:
    """Whether storing a version failed because another train stored one meanwhile."""
    message = str(exc.orig).lower()
    return ("unique" in message or "duplicate key" in message) if isinstance(
        exc, sa.exc.IntegrityError) else "database is locked" in message


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


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
