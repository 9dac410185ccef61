"""The daemon's side of the model lifecycle, run by the lease holder after each poll:
judge the challenger (promote or reject it when ``promote = "auto"``) and start a
retrain when one is due (``[monitor.retrain]``: on the schedule, or on drift).

A retrain runs in a thread of its own, off the scoring path: the monitor's polls go
on scoring with the active version meanwhile. The new version is stored in one
transaction fenced by the lease (a worker that lost the lease stores nothing; a
kill -9 during training leaves no version at all) as the monitor's challenger.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.cursors import BatchConflictError, Lease, fence, read_cursor
from anomaly_monitor.db import describe_error
from anomaly_monitor.detectors.progress import FitCancelledError, cancellable
from anomaly_monitor.drift import DriftReport
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import RegistryError, active_version, get_version
from anomaly_monitor.shadow import (
    REJECT_AFTER_BURN_INS,
    Gate,
    ShadowTotals,
    evaluate_gates,
    gates_pass,
    record_promotion,
    reject,
    shadow_totals,
    shadow_version,
)
from anomaly_monitor.tables import as_utc, model_versions, utcnow

# The daemon's log lines keep the logger name operators filter on.
log = logging.getLogger("anomaly_monitor.worker")

#: After a drift-triggered retrain, drift triggers no other for this long (seconds; a
#: schedule still does), so that a lasting shift trains one challenger, not one a poll.
DRIFT_RETRAIN_COOLDOWN_SECONDS = 3600.0
#: A failed retrain is tried again after this long (seconds) at the earliest (within one
#: process: ``run --once`` from cron tries at each run).
RETRAIN_RETRY_SECONDS = 600.0
#: The newest versions looked at for the last one of a trigger (older ones: none).
NEWEST_VERSIONS_SCANNED = 50
#: A stopping worker waits this long (seconds) for a retrain to stop at an epoch's end.
RETRAIN_STOP_WAIT_SECONDS = 30.0
#: Retrains a worker runs at once (over all its monitors; a due one waits for a slot).
MAX_CONCURRENT_RETRAINS = 1
_RETRAIN_SLOTS = threading.BoundedSemaphore(MAX_CONCURRENT_RETRAINS)


@dataclass(frozen=True)
class Judgement:
    """The challenger's gates and the shadow totals they judged."""

    version: int
    gates: list[Gate]
    totals: ShadowTotals


def judge(connection: sa.Connection, monitor: MonitorSettings) -> Judgement | None:
    """The challenger's gates now; ``None`` without a challenger."""
    version = shadow_version(connection, monitor.name)
    if version is None:
        return None
    challenger = get_version(connection, monitor.name, version)
    active_number = active_version(connection, monitor.name)
    active = get_version(connection, monitor.name, active_number) if active_number else None
    totals = shadow_totals(connection, monitor.name, version)
    return Judgement(version, evaluate_gates(challenger, active, totals, monitor.shadow),
                     totals)


def newest_version_at(connection: sa.Connection, monitor: str, trigger: str | None = None
                      ) -> dt.datetime | None:
    """When the monitor's newest version (of ``trigger`` only, when given) was stored."""
    query = sa.select(model_versions.c.created_at, model_versions.c.training).where(
        model_versions.c.monitor == monitor).order_by(model_versions.c.version.desc())
    for row in connection.execute(query.limit(NEWEST_VERSIONS_SCANNED)):
        if trigger is None or (row.training or {}).get("trigger") == trigger:
            return as_utc(row.created_at)
    return None


class Retrainer:
    """One monitor's retrains and challenger decisions in a worker."""

    def __init__(self, monitor: MonitorSettings, engine: sa.Engine, metrics: Metrics, *,
                 time_now: Callable[[], float], background: bool = True,
                 device: str = "auto") -> None:
        self.monitor = monitor
        self.engine = engine
        self.metrics = metrics
        self.time_now = time_now
        #: ``False`` (``run --once``): a due retrain runs in the poll, not a thread.
        self.background = background
        self.device = device
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._outcome: str | None = None
        self._failed_at: dt.datetime | None = None
        #: The challenger last said to hold retrains back (said once per challenger).
        self._said_waiting: int | None = None

    @property
    def training(self) -> bool:
        """Whether a retrain is running."""
        return self._thread is not None and self._thread.is_alive()

    def after_poll(self, lease: Lease, drift: DriftReport | None) -> None:
        """Judge the challenger, then start a retrain if one is due (never two)."""
        self._collect()
        try:
            self._decide(lease)
            trigger = None if self.training else self._due(drift)
        except BatchConflictError:
            return  # the lease is gone: the next holder decides
        except Exception as exc:  # a report and a decision, never the poll's failure
            log.warning("monitor %s: could not judge the challenger or the retrain "
                        "schedule (%s)", self.monitor.name,
                        describe_error(exc, self.engine.url),
                        exc_info=not isinstance(exc, (sa.exc.SQLAlchemyError, ValueError)))
            return
        if trigger is not None:
            self._start(lease, trigger)

    def _collect(self) -> None:
        """Count a finished background retrain."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
        if self._outcome is not None:
            outcome, self._outcome = self._outcome, None
            self.metrics.observe_retrain(self.monitor.name, outcome, self.time_now())

    def _decide(self, lease: Lease) -> None:
        """With ``promote = "auto"``: promote a challenger whose gates pass, reject one
        that still fails them after ``REJECT_AFTER_BURN_INS`` burn-ins."""
        monitor = self.monitor
        if monitor.shadow.promote != "auto":
            return
        with self.engine.connect() as connection:
            judgement = judge(connection, monitor)
        if judgement is None:
            return
        totals = judgement.totals
        if gates_pass(judgement.gates):
            self._promote(lease, judgement)
        elif totals.rows >= REJECT_AFTER_BURN_INS * monitor.shadow.shadow_rows:
            failed = [g.name for g in judgement.gates if g.passed is False]
            with self.engine.begin() as connection:
                fence(connection, monitor.name, lease, utcnow())
                reject(connection, monitor.name, judgement.version, by="gates",
                       reason=f"gates {', '.join(failed)} still failed after "
                              f"{totals.rows} rows in shadow")
            self.metrics.observe_decision(monitor.name, "rejected")
            log.warning("monitor %s: rejected challenger version %d: gates %s failed after "
                        "%d rows in shadow", monitor.name, judgement.version,
                        ", ".join(failed), totals.rows)

    def _promote(self, lease: Lease, judgement: Judgement) -> None:
        from anomaly_monitor.lifecycle import activate_checked

        monitor = self.monitor
        try:
            with self.engine.begin() as connection:
                fence(connection, monitor.name, lease, utcnow())
                # Still in shadow (rejected or replaced meanwhile: RegistryError), locked.
                record_promotion(connection, monitor, judgement.version, by="gates",
                                 gates=judgement.gates)
                activate_checked(connection, monitor, None, judgement.version,
                                 action="promote")
        except RegistryError as exc:
            log.info("monitor %s: challenger version %d not promoted: %s", monitor.name,
                     judgement.version, exc)
            return
        self.metrics.observe_decision(monitor.name, "promoted")
        log.info("monitor %s: promoted challenger version %d (every gate passed)",
                 monitor.name, judgement.version)

    def _due(self, drift: DriftReport | None) -> str | None:
        """``schedule`` or ``drift`` when a retrain is due now, else ``None``."""
        settings = self.monitor.retrain
        if settings is None:
            return None
        now = utcnow()
        if self._failed_at is not None and \
                (now - self._failed_at).total_seconds() < RETRAIN_RETRY_SECONDS:
            return None
        with self.engine.connect() as connection:
            waiting = shadow_version(connection, self.monitor.name)
            if waiting is not None:  # the challenger is judged first
                if waiting != self._said_waiting:
                    self._said_waiting = waiting
                    log.info("monitor %s: no retrain while challenger version %d is in "
                             "shadow%s", self.monitor.name, waiting,
                             "" if self.monitor.shadow.promote == "auto" else
                             " (promote = manual: anomaly-monitor models promote or reject "
                             "it)")
                return None
            if drift is not None and drift.version != active_version(connection,
                                                                     self.monitor.name):
                drift = None  # measured on a version no longer active
            newest = newest_version_at(connection, self.monitor.name)
            if settings.every_seconds is not None and (
                    newest is None or (now - newest).total_seconds() >= settings.every_seconds):
                return "schedule"
            if settings.on_drift and drift is not None and drift.drifting:
                last = newest_version_at(connection, self.monitor.name, "drift")
                if last is None or \
                        (now - last).total_seconds() >= DRIFT_RETRAIN_COOLDOWN_SECONDS:
                    return "drift"
        return None

    def _start(self, lease: Lease, trigger: str) -> None:
        if not _RETRAIN_SLOTS.acquire(blocking=False):
            log.debug("monitor %s: a retrain is due (%s); waiting for another monitor's to "
                      "finish", self.monitor.name, trigger)
            return
        log.info("monitor %s: retraining (%s); scoring goes on with the active version",
                 self.monitor.name, trigger)
        if not self.background:
            self._train(lease, trigger)
            self._collect()
            return
        self._thread = threading.Thread(target=self._train, args=(lease, trigger),
                                        name=f"retrain-{self.monitor.name}", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        """Stop a running retrain (at its next epoch; it stores nothing) and wait for it,
        at most ``RETRAIN_STOP_WAIT_SECONDS``: a stopping worker."""
        if not self.training or self._thread is None:
            return
        log.warning("monitor %s: stopping the running retrain; it stores nothing (the next "
                    "lease holder trains again)", self.monitor.name)
        self._cancel.set()
        self._thread.join(RETRAIN_STOP_WAIT_SECONDS)
        if self._thread.is_alive():
            log.warning("monitor %s: the retrain did not stop within %.0f s",
                        self.monitor.name, RETRAIN_STOP_WAIT_SECONDS)

    def _train(self, lease: Lease, trigger: str) -> None:
        """Train the challenger (in the retrain thread), holding a retrain slot; the
        outcome is counted by the next poll."""
        try:
            self._train_once(lease, trigger)
        finally:
            _RETRAIN_SLOTS.release()

    def _train_once(self, lease: Lease, trigger: str) -> None:
        from anomaly_monitor.lifecycle import train_monitor

        monitor = self.monitor
        settings = monitor.retrain
        assert settings is not None
        try:
            with self.engine.connect() as connection:
                cursor = read_cursor(connection, monitor.name)
            # The window ends at the newest scored row (its timestamp; now without one).
            newest = (cursor.position_timestamp if cursor is not None else None) or utcnow()
            since = (newest - dt.timedelta(seconds=settings.window_seconds)
                     if settings.window_seconds is not None else None)
            with cancellable(self._cancel):
                report = train_monitor(
                    self.engine, monitor, since=since, limit=settings.window_rows,
                    device=self.device, activate_version=False, exclude=settings.exclude,
                    up_to_id=cursor.position if cursor is not None else None, lease=lease,
                    trigger=trigger)
        except FitCancelledError:
            log.info("monitor %s: retrain (%s) stopped with the worker", monitor.name, trigger)
            return
        except BatchConflictError as exc:
            log.warning("monitor %s: retrain stored nothing: %s", monitor.name, exc)
            self._outcome = "lease_lost"
            return
        except Exception as exc:  # a retrain never kills the worker
            window = (f"window_rows {settings.window_rows}" if settings.window_rows else
                      f"window_seconds {settings.window_seconds:g} up to the newest scored row")
            log.error("monitor %s: retrain (%s, %s) failed: %s", monitor.name, trigger, window,
                      describe_error(exc, self.engine.url),
                      exc_info=not isinstance(exc, (ValueError, sa.exc.SQLAlchemyError)))
            self._failed_at = utcnow()
            self._outcome = "failed"
            return
        self._failed_at = None
        self.metrics.observe_cuda_oom(monitor.name, report.version.training.get("cuda_oom", {}))
        self._outcome = "success"
        log.info("monitor %s: retrained (%s): version %d scores in shadow for %d rows, "
                 "then %s", monitor.name, trigger, report.version.version,
                 settings.shadow_rows, "its gates decide" if settings.promote == "auto"
                 else "promote it by hand (anomaly-monitor models promote)")

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a running retrain (a stopping worker, tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._collect()
