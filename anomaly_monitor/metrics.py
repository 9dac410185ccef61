"""Prometheus metrics (prefix ``anomaly_monitor_``) on an injected registry.

Every series of a monitor exists from the start at 0, so that rate() and
absent()-style alerts work before the first anomaly. Tests build a fresh
``CollectorRegistry`` per test and read values back with ``get_sample_value``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from anomaly_monitor.detectors.cuda_memory import OOM_ACTIONS
from anomaly_monitor.drift import DRIFT_LEVEL
from anomaly_monitor.feedback import PRECISION_WINDOW_FLAGS
from anomaly_monitor.reading.values import REASONS
from anomaly_monitor.tables import LABELS

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

    from anomaly_monitor.batch import BatchResult
    from anomaly_monitor.drift import DriftReport

PREFIX = "anomaly_monitor"
OUTCOMES = ("success", "error")
RETRAIN_OUTCOMES = ("success", "failed", "lease_lost")
DECISIONS = ("promoted", "rejected")
#: Batch durations from 10 ms to 2 minutes.
DURATION_BUCKETS_SECONDS = (0.01, 0.05, 0.25, 1, 5, 30, 120)
SEVERITY_BUCKETS = (25, 50, 75, 90, 99)
#: Why a monitor is paused, the ``cause`` label of ``anomaly_monitor_pause_info``.
PAUSE_CAUSES = ("schema", "model", "ids_restarted", "slow_reads", "repeated_failures")
#: The pause reason is cut to this many characters in the ``reason`` label.
PAUSE_REASON_MAX_CHARS = 160


class Metrics:
    """All metrics of the service, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["monitor"]
        self.rows_scored = Counter(f"{PREFIX}_rows_scored", "Rows scored.", labels,
                                   registry=registry)
        self.rows_flagged = Counter(f"{PREFIX}_rows_flagged", "Rows flagged as anomalous "
                                    "(outside suppression windows).", labels,
                                    registry=registry)
        self.rows_suppressed = Counter(
            f"{PREFIX}_rows_suppressed", "Flagged rows stamped inside a suppression window "
            "(stored, marked, not counted in rows_flagged_total, no incident or alert).",
            labels, registry=registry)
        self.rows_quarantined = Counter(
            f"{PREFIX}_rows_quarantined", "Rows that could not be scored, by reason.",
            ["monitor", "reason"], registry=registry)
        self.batches = Counter(f"{PREFIX}_batches", "Batches attempted, by outcome.",
                               ["monitor", "outcome"], registry=registry)
        self.batch_duration = Histogram(
            f"{PREFIX}_batch_duration_seconds", "Wall time of a committed batch.", labels,
            buckets=DURATION_BUCKETS_SECONDS, registry=registry)
        self.last_success = Gauge(
            f"{PREFIX}_last_success_timestamp_seconds",
            "Unix time of the last successful poll (a batch committed or nothing to do).",
            labels, registry=registry)
        self.source_lag = Gauge(
            f"{PREFIX}_source_lag_seconds",
            "Now minus the timestamp of the newest scored row.", labels, registry=registry)
        self.backlog = Gauge(f"{PREFIX}_backlog_rows", "Source rows after the cursor.", labels,
                             registry=registry)
        self.threshold = Gauge(f"{PREFIX}_threshold", "The active threshold.", labels,
                               registry=registry)
        self.expected_ratio = Gauge(
            f"{PREFIX}_expected_anomaly_ratio",
            "Share of rows the active threshold flags on the held-out calibration rows "
            "(what the anomaly rate is compared with).", labels, registry=registry)
        self.interval = Gauge(f"{PREFIX}_interval_seconds",
                              "The monitor's configured polling interval.", labels,
                              registry=registry)
        self.model_info = Gauge(
            f"{PREFIX}_model_info", "The active model version (value 1).",
            ["monitor", "version", "kind"], registry=registry)
        self.severity = Histogram(
            f"{PREFIX}_severity", "Severity (0-100) of flagged rows.", labels,
            buckets=SEVERITY_BUCKETS, registry=registry)
        self.late_rows = Counter(
            f"{PREFIX}_late_rows", "Rows found behind the cursor and scored late.", labels,
            registry=registry)
        self.new_entities = Counter(
            f"{PREFIX}_new_entities", "Entities of a window monitor first seen while scoring "
            "(learned from their first samples).", labels, registry=registry)
        self.learning_rows = Counter(
            f"{PREFIX}_learning_rows", "Rows of a window monitor scored 0 because their "
            "entity was still learning its calibration.", labels, registry=registry)
        self.paused = Gauge(f"{PREFIX}_paused",
                            "1 while the monitor is paused (the reason is in 'status').",
                            labels, registry=registry)
        self.pause_info = Gauge(
            f"{PREFIX}_pause_info", "1 while the monitor is paused, with the cause (one of "
            f"{', '.join(PAUSE_CAUSES)}) and the reason; no series while it runs.",
            ["monitor", "cause", "reason"], registry=registry)
        self._pause_labels: dict[str, tuple[str, str]] = {}
        self.id_restarts = Counter(
            f"{PREFIX}_id_restarts", "Times the table's ids were found no longer to continue "
            "from the cursor (the monitor pauses until the cursor is moved).", labels,
            registry=registry)
        self.future_rows = Counter(
            f"{PREFIX}_future_rows", "Rows stamped over an hour in the future, scored "
            "without waiting for query_delay_seconds.", labels, registry=registry)
        self.rows_below = Gauge(
            f"{PREFIX}_rows_below_cursor", "Rows written below the cursor that no batch "
            "read, at least (counted every few minutes; anomaly-monitor backfill scores "
            "them).", labels, registry=registry)
        self.incidents = Counter(
            f"{PREFIX}_incidents", "Incidents opened (flags of one monitor and entity that "
            "follow each other within the monitor's gap).", labels, registry=registry)
        self.incidents_open = Gauge(
            f"{PREFIX}_incidents_open", "Incidents open now (as last read by the lease "
            "holder; 0 on a standby).", labels, registry=registry)
        self.incident_severity = Gauge(
            f"{PREFIX}_incident_severity", "Severity (0-100) of each incident at or above "
            "the monitor's alert_severity, open or closed in the last 10 minutes (at most 50 "
            "per monitor, the most severe); no series for the others.",
            ["monitor", "entity", "incident"], registry=registry)
        self._incident_labels: dict[str, set[tuple[str, str]]] = {}
        self.feedback = Counter(
            f"{PREFIX}_feedback", "Labels operators gave flags and incidents (anomaly-monitor "
            "label) since this process first read them, by label: tp true, fp false "
            "positive; read from the database by the lease holder.",
            ["monitor", "label"], registry=registry)
        self._feedback_seen: dict[tuple[str, str], int] = {}
        self.feedback_precision = Gauge(
            f"{PREFIX}_feedback_precision", "Share of true positives among the newest "
            f"{PRECISION_WINDOW_FLAGS} labelled flags (NaN before any label).", labels,
            registry=registry)
        self._model_labels: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._lifecycle(registry)

    def _lifecycle(self, registry: CollectorRegistry) -> None:
        """The model lifecycle's series: drift, the challenger, retraining."""
        labels = ["monitor"]
        self.drift_score = Gauge(
            f"{PREFIX}_drift_score", "The largest population stability index (PSI) of a "
            "feature of the recent rows (about a day of them, at least 2000) against the active "
            "version's "
            "training rows; 0 until it scored 500 rows.", labels, registry=registry)
        self.drifted_features = Gauge(
            f"{PREFIX}_drifted_features", f"Features whose PSI reaches {DRIFT_LEVEL:g}.",
            labels, registry=registry)
        self.score_drift = Gauge(
            f"{PREFIX}_score_drift", "PSI of the recent rows' scores against the active "
            "version's held-out scores.", labels, registry=registry)
        self.shadow_rows = Counter(
            f"{PREFIX}_shadow_rows", "Rows a challenger scored in shadow.", labels,
            registry=registry)
        self.shadow_flagged = Counter(
            f"{PREFIX}_shadow_flagged", "Rows a challenger flagged in shadow (not written).",
            labels, registry=registry)
        self.retrains = Counter(
            f"{PREFIX}_retrains", "Retrains the daemon ran, by outcome (success, failed, "
            "lease_lost: stored nothing because another worker took the lease).",
            ["monitor", "outcome"], registry=registry)
        self.last_retrain = Gauge(
            f"{PREFIX}_last_retrain_success_timestamp_seconds",
            "Unix time of the daemon's last successful retrain (0: none since the start).",
            labels, registry=registry)
        self.cuda_oom = Counter(
            f"{PREFIX}_cuda_oom", "CUDA out-of-memory errors handled while scoring or "
            "retraining, by action: halved (the batch, then retried), cpu (moved to the "
            "CPU); exist from the start where CUDA is used.", ["monitor", "action"],
            registry=registry)
        self.decisions = Counter(
            f"{PREFIX}_challenger_decisions", "Challengers the daemon's gates promoted or "
            "rejected (promote = \"auto\").", ["monitor", "decision"], registry=registry)

    def init_monitors(self, monitors: Mapping[str, float],
                      windows: Collection[str] = (), retraining: Collection[str] = ()) -> None:
        """Create every series of each monitor (name: interval in seconds) at 0; the
        window monitors' own series only for ``windows``, the retraining ones only for
        ``retraining``."""
        for monitor, interval in monitors.items():
            for metric in (self.rows_scored, self.rows_flagged, self.rows_suppressed,
                           self.batch_duration,
                           self.last_success, self.source_lag, self.backlog, self.threshold,
                           self.expected_ratio, self.severity, self.late_rows, self.paused,
                           self.id_restarts, self.future_rows, self.rows_below,
                           self.incidents, self.incidents_open):
                metric.labels(monitor)
            if monitor in windows:
                self.new_entities.labels(monitor)
                self.learning_rows.labels(monitor)
            self.interval.labels(monitor).set(interval)
            for reason in REASONS:
                self.rows_quarantined.labels(monitor, reason)
            for outcome in OUTCOMES:
                self.batches.labels(monitor, outcome)
            for label in LABELS:
                self.feedback.labels(monitor, label)
            self.feedback_precision.labels(monitor).set(math.nan)
            self.set_model(monitor, "none", "none", None)
            for metric in (self.drift_score, self.drifted_features, self.score_drift):
                metric.labels(monitor)
            if monitor in retraining:
                self.init_retraining(monitor)

    def init_retraining(self, monitor: str) -> None:
        """Create the series of a monitor the daemon retrains (``[monitor.retrain]``) at 0
        (a challenger of another monitor creates its shadow series when it first scores)."""
        for metric in (self.shadow_rows, self.shadow_flagged, self.last_retrain):
            metric.labels(monitor)
        for outcome in RETRAIN_OUTCOMES:
            self.retrains.labels(monitor, outcome)
        for decision in DECISIONS:
            self.decisions.labels(monitor, decision)

    def set_model(self, monitor: str, version: str, kind: str, threshold: float | None,
                  expected_ratio: float | None = None) -> None:
        """Point ``model_info`` at the active version; set the threshold and the expected
        anomaly ratio gauges."""
        with self._lock:
            old = self._model_labels.get(monitor)
            if old is not None and old != (version, kind):
                self.model_info.remove(monitor, *old)
            self._model_labels[monitor] = (version, kind)
            self.model_info.labels(monitor, version, kind).set(0 if version == "none" else 1)
        if threshold is not None:
            self.threshold.labels(monitor).set(threshold)
        if expected_ratio is not None:
            self.expected_ratio.labels(monitor).set(expected_ratio)

    def observe_batch(self, result: BatchResult) -> None:
        """Count a committed batch."""
        monitor = result.monitor
        self.batches.labels(monitor, "success").inc()
        self.rows_scored.labels(monitor).inc(result.scored)
        self.rows_flagged.labels(monitor).inc(result.flagged - result.suppressed)
        if result.suppressed:
            self.rows_suppressed.labels(monitor).inc(result.suppressed)
        for reason, count in result.quarantine_reasons.items():
            self.rows_quarantined.labels(monitor, reason).inc(count)
        if result.future_rows:
            self.future_rows.labels(monitor).inc(result.future_rows)
        if result.new_entities:
            self.new_entities.labels(monitor).inc(result.new_entities)
        if result.learning_rows:
            self.learning_rows.labels(monitor).inc(result.learning_rows)
        if result.incidents_opened:
            self.incidents.labels(monitor).inc(result.incidents_opened)
        self.batch_duration.labels(monitor).observe(result.duration_seconds)
        for value in result.severities:
            self.severity.labels(monitor).observe(float(value))
        if result.drift is not None:
            self.set_drift(monitor, result.drift)
        if result.shadow is not None:
            self.shadow_rows.labels(monitor).inc(result.shadow.rows)
            self.shadow_flagged.labels(monitor).inc(result.shadow.flagged)

    def set_drift(self, monitor: str, report: DriftReport) -> None:
        """Publish a drift report (0 before it measured enough rows)."""
        self.drift_score.labels(monitor).set(report.drift_score)
        self.drifted_features.labels(monitor).set(len(report.drifted))
        self.score_drift.labels(monitor).set(report.score_drift if report.measured else 0.0)

    def clear_drift(self, monitor: str) -> None:
        """Drift at 0 (a standby: the lease holder reports it)."""
        for gauge in (self.drift_score, self.drifted_features, self.score_drift):
            gauge.labels(monitor).set(0)

    def observe_retrain(self, monitor: str, outcome: str, now: float) -> None:
        """Count a retrain by outcome; a success also sets its timestamp."""
        self.retrains.labels(monitor, outcome).inc()
        if outcome == "success":
            self.last_retrain.labels(monitor).set(now)

    def init_cuda(self, monitors: Iterable[str]) -> None:
        """Create the CUDA out-of-memory series at 0 (a worker that scores on CUDA)."""
        for monitor in monitors:
            for action in OOM_ACTIONS:
                self.cuda_oom.labels(monitor, action)

    def observe_cuda_oom(self, monitor: str, counts: Mapping[str, int]) -> None:
        """Count CUDA out-of-memory events by action."""
        for action, count in counts.items():
            if count:
                self.cuda_oom.labels(monitor, action).inc(count)

    def observe_decision(self, monitor: str, decision: str) -> None:
        """Count a challenger the gates promoted or rejected."""
        self.decisions.labels(monitor, decision).inc()

    def set_paused(self, monitor: str, paused: bool, cause: str | None = None,
                   reason: str = "") -> None:
        """Whether the monitor is paused (1, with its ``cause``, one of
        :data:`PAUSE_CAUSES`) or running (0); while paused, the one ``pause_info``
        series of the monitor carries ``cause`` and ``reason`` (cut to
        :data:`PAUSE_REASON_MAX_CHARS`), so that an alert can show them."""
        if paused and cause not in PAUSE_CAUSES:
            raise ValueError(f"a pause needs a cause among {PAUSE_CAUSES}, not {cause!r}")
        self.paused.labels(monitor).set(1 if paused else 0)
        labels = (str(cause), reason[:PAUSE_REASON_MAX_CHARS]) if paused else None
        with self._lock:
            old = self._pause_labels.pop(monitor, None)
            if old is not None and old != labels:
                self.pause_info.remove(monitor, *old)
            if labels is not None:
                self._pause_labels[monitor] = labels
                self.pause_info.labels(monitor, *labels).set(1)

    def set_incidents(self, monitor: str, open_now: int,
                      alerting: Iterable[tuple[int, str, float]]) -> None:
        """Publish the open incidents: their number, and one ``incident_severity`` series
        per alerting incident (id, entity, severity); series of the others go."""
        self.incidents_open.labels(monitor).set(open_now)
        with self._lock:
            wanted = {(entity, str(incident)): severity
                      for incident, entity, severity in alerting}
            for labels in self._incident_labels.get(monitor, set()) - wanted.keys():
                self.incident_severity.remove(monitor, *labels)
            for labels, severity in wanted.items():
                self.incident_severity.labels(monitor, *labels).set(severity)
            self._incident_labels[monitor] = set(wanted)

    def set_feedback(self, monitor: str, counts: Mapping[str, int],
                     precision: float | None) -> None:
        """Publish the labels given (``counts``: the database's totals, by label; the
        counters rise by what is new since the first call of this process, so that a
        restart or a takeover is no burst of every label ever given) and the recent
        precision (``None``: no label yet)."""
        with self._lock:
            for label, total in counts.items():
                seen = self._feedback_seen.setdefault((monitor, label), total)
                if total > seen:
                    self.feedback.labels(monitor, label).inc(total - seen)
                    self._feedback_seen[(monitor, label)] = total
        self.feedback_precision.labels(monitor).set(math.nan if precision is None
                                                    else precision)

    def observe_id_restart(self, monitor: str) -> None:
        """Count a table found restarted under the cursor."""
        self.id_restarts.labels(monitor).inc()

    def set_rows_below(self, monitor: str, rows: int) -> None:
        """Publish the last count of rows written below the cursor."""
        self.rows_below.labels(monitor).set(rows)

    def observe_late_rows(self, monitor: str, rows: int) -> None:
        """Count rows found behind the cursor and scored late."""
        self.late_rows.labels(monitor).inc(rows)

    def observe_error(self, monitor: str) -> None:
        """Count a failed batch."""
        self.batches.labels(monitor, "error").inc()

    def observe_poll(
        self, monitor: str, *, now: float, backlog: int | None, newest_timestamp: float | None
    ) -> None:
        """Record a successful poll: success time, and backlog and lag when known (a
        standby worker knows neither)."""
        self.last_success.labels(monitor).set(now)
        if backlog is not None:
            self.backlog.labels(monitor).set(backlog)
        if newest_timestamp is not None:
            self.source_lag.labels(monitor).set(max(0.0, now - newest_timestamp))


class WithoutCreated:
    """``registry`` as scraped: without the ``*_created`` series client_python adds to
    every counter and histogram (a series per counter that no rule or panel reads)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family

    def restricted_registry(self, names: Iterable[str]) -> WithoutCreated:
        """The same for a scrape that asks for some names only (``?name[]=...``)."""
        return WithoutCreated(self._registry.restricted_registry(names))


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread (without
    the ``*_created`` series)."""
    return start_http_server(port, addr=host, registry=WithoutCreated(registry))  # type: ignore[arg-type]
