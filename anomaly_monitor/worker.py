"""The daemon: an APScheduler interval job per monitor around :func:`run_batch`.

Each job (``max_instances=1``, coalesced) calls ``run_batch`` until the monitor
is caught up, its time budget is spent or a stop is requested. Database errors
are logged, counted and retried with capped exponential backoff; a monitor whose
table, columns or model are wrong is paused with the reason (shown by
``status``) and resumes by itself once the problem is fixed, while the other
monitors keep running. SIGTERM and SIGINT let the current batch commit or roll
back, then the process exits 0.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from types import FrameType

import sqlalchemy as sa

from anomaly_monitor.batch import BatchResult, ReadState, run_batch, sweep_late_rows
from anomaly_monitor.config import MonitorSettings, Settings, lease_duration
from anomaly_monitor.cursors import (
    BatchConflictError,
    Lease,
    claim,
    read_cursor,
    release,
    set_paused,
    worker_identity,
)
from anomaly_monitor.db import describe_error
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import ModelCache, RegistryError
from anomaly_monitor.scoring import check_features
from anomaly_monitor.source import SchemaError, SourceTable, count_after, reflect_source
from anomaly_monitor.tables import as_utc, batches

log = logging.getLogger(__name__)

#: A job stops calling run_batch after this share of its interval (at least the minimum).
JOB_BUDGET_FRACTION = 0.9
MIN_JOB_BUDGET_SECONDS = 5.0
#: Retry delays after database errors: doubling from the initial value up to the cap.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
#: How often the main thread checks for a stop request.
STOP_POLL_SECONDS = 0.5
#: An error that is not a lost connection (a constraint, a missing table, a bug) pauses
#: the monitor after this many consecutive failures instead of being retried forever.
PAUSE_AFTER_FAILURES = 5
#: Read paths: ``auto`` (Arrow for full windows where the driver has it), ``plain``.
READERS: tuple[str, ...] = ("auto", "plain")
#: ``run --once`` gives up on a monitor after this many consecutive failures.
ONCE_MAX_FAILURES = 3


def renew_period(monitor: MonitorSettings) -> float:
    """Seconds between a live leader's lease renewals at most (one batch aside): it
    renews at the start of every poll and every third of the lease within one."""
    return max(monitor.interval_seconds, lease_duration(monitor) / 3)


def _when(moment: dt.datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z" if moment is not None else "it is released"


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a lost or refused connection, worth retrying forever."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError
                      | sa.exc.DisconnectionError | sa.exc.TimeoutError | OSError)


class Status(StrEnum):
    """Where a monitor stands in this worker (shown by ``run --once``)."""

    STARTING = "starting"
    RUNNING = "running"
    STANDBY = "standby"  # another worker holds the lease
    PAUSED = "paused"  # a table, column or model problem; re-checked every poll
    ERROR = "error"  # the last batch failed; retried after a backoff
    NO_MODEL = "no_model"


@dataclass(frozen=True)
class Clock:
    """Where the worker reads time: ``monotonic`` for delays and budgets, ``time`` (Unix
    seconds) for metrics. Lease times come from the database, never from here."""

    monotonic: Callable[[], float] = time.monotonic
    time: Callable[[], float] = time.time


@dataclass
class MonitorState:
    """What the worker knows about one monitor between jobs."""

    status: Status = Status.STARTING
    detail: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    source: SourceTable | None = None
    batches: int = 0
    rows: int = 0
    flagged: int = 0
    quarantined: int = 0
    newest_timestamp: dt.datetime | None = None
    lease: Lease | None = None
    lease_renewed: float = 0.0
    #: The lease holder this standby last logged that it waits for.
    waiting_for: str | None = None
    read_state: ReadState = field(default_factory=ReadState)


class Worker:
    """Runs the monitors of ``settings`` against ``engine``, reporting to ``metrics``."""

    def __init__(
        self,
        settings: Settings,
        engine: sa.Engine,
        metrics: Metrics,
        *,
        device: str = "auto",
        monitors: list[str] | None = None,
        threads: int | None = None,
        clock: Clock | None = None,
        reader: str = "auto",
    ) -> None:
        self.settings = settings
        self.clock = clock or Clock()
        self.engine = engine
        self.metrics = metrics
        self.models = ModelCache(device, threads=threads)
        chosen = [settings.monitor(name) for name in monitors] if monitors else settings.monitors
        self.monitors: dict[str, MonitorSettings] = {m.name: m for m in chosen}
        if reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}; got {reader!r}")
        self.states = {name: MonitorState(read_state=ReadState(use_arrow=reader == "auto"))
                       for name in self.monitors}
        self.stop_event = threading.Event()
        self.owner = worker_identity()
        metrics.init_monitors({m.name: m.interval_seconds for m in chosen})

    # -- one monitor ------------------------------------------------------------------

    def _source(self, monitor: MonitorSettings) -> SourceTable:
        state = self.states[monitor.name]
        if state.source is None:
            with self.engine.connect() as connection:
                state.source = reflect_source(connection, monitor)
        return state.source

    def _pause(self, monitor: MonitorSettings, reason: str) -> None:
        state = self.states[monitor.name]
        state.status, state.detail, state.source = Status.PAUSED, reason, None
        state.read_state.close()
        log.error("monitor %s paused: %s", monitor.name, reason)
        self.metrics.set_paused(monitor.name, True)
        with self.engine.begin() as connection:
            set_paused(connection, monitor.name, reason)

    def _try_resume(self, monitor: MonitorSettings) -> None:
        """Re-check a paused monitor's table and model; resume it when both are fine
        (a problem raises, and the monitor stays paused)."""
        source = self._source(monitor)
        with self.engine.connect() as connection:
            model = self.models.active(connection, monitor.name)
        if model is not None:
            check_features(monitor, model.version)
            source.feature_columns(model.version.features)
        with self.engine.begin() as connection:
            set_paused(connection, monitor.name, None)
        log.info("monitor %s resumed", monitor.name)
        self.metrics.set_paused(monitor.name, False)

    def _record(self, monitor: MonitorSettings, result: BatchResult) -> None:
        state = self.states[monitor.name]
        state.failures, state.detail = 0, None
        state.status = Status.RUNNING if result.status in ("committed", "idle") \
            else Status(result.status)
        if result.status == "no_model":
            state.detail = f"no active model; run: anomaly-monitor train {monitor.name}"
        if result.status == "committed":
            state.batches += 1
            state.rows += result.rows
            state.flagged += result.flagged
            state.quarantined += result.quarantined
            self.metrics.observe_batch(result)
            log.info("monitor %s: ids %s-%s, %d rows, %d flagged, %d quarantined (%.3f s)",
                     monitor.name, result.first_id, result.last_id, result.rows,
                     result.flagged, result.quarantined, result.duration_seconds)

    def _failed(self, monitor: MonitorSettings, exc: BaseException) -> float:
        """Count a failed batch; returns the backoff delay in seconds.

        A persistent error that is not a lost connection pauses the monitor.
        """
        state = self.states[monitor.name]
        state.failures += 1
        if state.failures >= PAUSE_AFTER_FAILURES and not is_transient(exc):
            self.metrics.observe_error(monitor.name)
            reason = f"{state.failures} failures in a row: {describe_error(exc, self.engine.url)}"
            try:
                self._pause(monitor, reason)
            except Exception:  # the database may refuse the pause too
                state.status, state.detail = Status.PAUSED, reason
            return 0.0
        # Capped at the interval, so that a returning database is used within two intervals.
        cap = min(BACKOFF_MAX_SECONDS, monitor.interval_seconds)
        delay = min(cap, BACKOFF_INITIAL_SECONDS * 2 ** (state.failures - 1))
        state.status = Status.ERROR
        state.detail = describe_error(exc, self.engine.url)
        state.retry_at = self.clock.monotonic() + delay
        state.source = None
        self.metrics.observe_error(monitor.name)
        log.warning("monitor %s: batch failed (%s); retrying in %.0f s",
                    monitor.name, state.detail, delay)
        return delay

    def _step(self, monitor: MonitorSettings, first_try: bool = True) -> BatchResult | None:
        """One batch with its error handling; ``None`` after a failure or a pause."""
        state = self.states[monitor.name]
        try:
            if state.status == Status.PAUSED:
                self._try_resume(monitor)
            result = run_batch(self.engine, monitor, self._source(monitor), self.models,
                               lease=state.lease, read_state=state.read_state)
        except (SchemaError, RegistryError) as exc:
            self._pause(monitor, str(exc))
            return None
        except BatchConflictError as exc:
            log.warning("%s", exc)
            state.lease = None  # claim again (or stand by) at the next poll
            state.status = Status.STANDBY
            state.read_state.close()
            return None
        except Exception as exc:  # the daemon never dies on data or the DB
            if not isinstance(exc, sa.exc.SQLAlchemyError):
                log.exception("monitor %s: unexpected error", monitor.name)
            self._failed(monitor, exc)
            return None
        if result.status == "paused":
            # Paused by an earlier process: re-check now rather than an interval later.
            state.status = Status.PAUSED
            with self.engine.connect() as connection:
                cursor = read_cursor(connection, monitor.name)
            state.detail = cursor.pause_reason if cursor else None
            return self._step(monitor, first_try=False) if first_try else result
        self._record(monitor, result)
        return result

    def poll(
        self, name: str, *, budget_seconds: float | None = None, max_failures: int | None = None
    ) -> MonitorState:
        """Run batches for monitor ``name`` until caught up, out of budget, stopped, or
        (with ``max_failures``) failed that many times in a row."""
        monitor = self.monitors[name]
        state = self.states[name]
        if budget_seconds is None:
            budget_seconds = max(MIN_JOB_BUDGET_SECONDS,
                                 JOB_BUDGET_FRACTION * monitor.interval_seconds)
        clock = self.clock.monotonic
        deadline = clock() + budget_seconds
        last: BatchResult | None = None
        first = True
        while not self.stop_event.is_set():
            wait = state.retry_at - clock()
            if wait > 0 and (clock() + wait > deadline or self.stop_event.wait(wait)):
                break
            if not self._hold_lease(monitor, renew=first):
                break
            first = False
            result = self._step(monitor)
            if result is None:
                if state.status in (Status.PAUSED, Status.STANDBY) or (
                        max_failures is not None and state.failures >= max_failures):
                    break
                continue
            last = result
            if result.caught_up or clock() >= deadline:
                break
        if last is not None and last.status in ("committed", "idle"):
            self._sweep(monitor, last)
            self._report_poll(monitor, last)
        return state

    def _hold_lease(self, monitor: MonitorSettings, *, renew: bool = False) -> bool:
        """Claim or renew the monitor's lease (when ``renew``, at the start of each poll,
        and a third of its duration after the last renewal); ``False`` while another
        worker holds it or the database fails."""
        state = self.states[monitor.name]
        seconds = lease_duration(monitor)
        since = self.clock.monotonic() - state.lease_renewed
        if state.lease is not None and not renew and since < seconds / 3:
            return True
        try:
            with self.engine.begin() as connection:
                result = claim(connection, monitor.name, self.owner, seconds, state.lease,
                               renew_period=renew_period(monitor))
        except Exception as exc:  # a database error: retried with backoff
            self._failed(monitor, exc)
            return False
        if not result.cursor_exists:  # no model was ever activated: nothing to score
            state.lease, state.status = None, Status.NO_MODEL
            state.detail = f"no active model; run: anomaly-monitor train {monitor.name}"
            # Polled fine: AnomalyMonitorNoModel, not Stalled, tells the operator.
            self.metrics.observe_poll(monitor.name, now=self.clock.time(), backlog=None,
                                      newest_timestamp=None)
            return False
        if result.lease is None:
            if state.lease is not None:
                log.warning("monitor %s: lease lost to %s", monitor.name, result.holder)
                state.read_state.close()
            elif state.waiting_for != result.holder:  # once per leader, not every poll
                log.info("monitor %s: standing by; %s holds the lease until %s (database "
                         "clock)", monitor.name, result.holder, _when(result.expires_at))
            state.lease, state.status, state.waiting_for = None, Status.STANDBY, result.holder
            state.detail = (f"another worker ({result.holder}) holds the lease until "
                            f"{_when(result.expires_at)}" if result.holder is not None else
                            "the lease changed hands during the claim; claiming it again at "
                            "the next poll")
            # Standing by is this worker's success: without it a standby replica would
            # look stalled to the AnomalyMonitorStalled alert.
            self.metrics.observe_poll(monitor.name, now=self.clock.time(), backlog=None,
                                      newest_timestamp=None)
            return False
        if result.taken_from is not None:
            log.warning("monitor %s: took the lease over from %s, which is gone (token %d)",
                        monitor.name, result.taken_from, result.lease.token)
        elif state.lease is None:
            log.info("monitor %s: lease acquired (token %d)", monitor.name, result.lease.token)
        state.waiting_for = None
        state.lease, state.lease_renewed = result.lease, self.clock.monotonic()
        return True

    def _sweep(self, monitor: MonitorSettings, last: BatchResult) -> None:
        """Score late rows behind the cursor, at the position and version ``last`` read."""
        state = self.states[monitor.name]
        if state.lease is None:
            return
        known = (last.position, last.version) if last.position is not None \
            and last.version is not None else None
        try:
            late = sweep_late_rows(self.engine, monitor, self._source(monitor), self.models,
                                   lease=state.lease, known=known)
        except Exception as exc:  # the sweep must not kill the job
            self._failed(monitor, exc)
            return
        if late is not None:
            self._record(monitor, late)
            self.metrics.observe_late_rows(monitor.name, late.rows)

    def release_leases(self) -> None:
        """Give up every held lease so that a standby worker takes over at once (and
        close the monitors' Arrow readers)."""
        for state in self.states.values():
            state.read_state.close()
            if state.lease is None:
                continue
            try:
                with self.engine.begin() as connection:
                    release(connection, state.lease)
            except Exception as exc:  # the lease then simply expires
                log.warning("could not release the lease on %s: %s", state.lease.monitor,
                            describe_error(exc, self.engine.url))
            state.lease = None

    def _report_poll(self, monitor: MonitorSettings, last: BatchResult) -> None:
        try:
            with self.engine.connect() as connection:
                # The poll's last batch read the cursor and the version: not read again.
                backlog = (count_after(connection, self._source(monitor), last.position)
                           if last.position is not None else None)
        except Exception as exc:  # metrics must not kill the job, nor count as a failed batch
            log.warning("monitor %s: could not measure the backlog (%s)", monitor.name,
                        describe_error(exc, self.engine.url))
            return
        state = self.states[monitor.name]
        if last.newest_timestamp is not None:
            state.newest_timestamp = last.newest_timestamp
        elif state.newest_timestamp is None:
            state.newest_timestamp = self._newest_scored(monitor)
        newest = state.newest_timestamp.timestamp() if state.newest_timestamp else None
        self.metrics.observe_poll(monitor.name, now=self.clock.time(), backlog=backlog,
                                  newest_timestamp=newest)
        self.metrics.set_paused(monitor.name, False)
        model = last.version
        if model is not None:
            self.metrics.set_model(monitor.name, str(model.version), model.kind,
                                   model.threshold, model.expected_ratio())

    def _newest_scored(self, monitor: MonitorSettings) -> dt.datetime | None:
        """The newest source timestamp of the monitor's last batch (after a restart)."""
        with self.engine.connect() as connection:
            value = connection.execute(
                sa.select(batches.c.newest_timestamp).where(batches.c.monitor == monitor.name)
                .order_by(batches.c.id.desc()).limit(1)
            ).scalar()
        return as_utc(value)

    # -- all monitors ---------------------------------------------------------------

    def run_once(self) -> dict[str, MonitorState]:
        """Process everything pending on every monitor once (``run --once``)."""
        try:
            for name in self.monitors:
                if not self.stop_event.is_set():
                    self.poll(name, budget_seconds=float("inf"), max_failures=ONCE_MAX_FAILURES)
        finally:
            self.release_leases()
        return self.states

    def wait_for_database(self, check: Callable[[], None]) -> bool:
        """Call ``check`` until it stops raising connection errors (capped backoff).

        Returns ``False`` when a stop was requested first. Other errors propagate.
        """
        delay = BACKOFF_INITIAL_SECONDS
        while not self.stop_event.is_set():
            try:
                check()
                return True
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("database unavailable (%s); retrying in %.0f s",
                            describe_error(exc, self.engine.url), delay)
                self.stop_event.wait(delay)
                delay = min(BACKOFF_MAX_SECONDS, delay * 2)
        return False

    def install_signal_handlers(self) -> Callable[[], None]:
        """Let SIGTERM and SIGINT stop the worker after the current batch.

        Returns a function that restores the previous handlers.
        """
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def run_forever(self, *, install_signals: bool = True) -> None:
        """Schedule every monitor and block until SIGTERM/SIGINT or :meth:`stop`."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        if install_signals:
            self.install_signal_handlers()
        self.preload_models()
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max(1, min(len(self.monitors), 8)))},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
            timezone=dt.UTC,
        )
        now = dt.datetime.now(dt.UTC)
        for name, monitor in self.monitors.items():
            scheduler.add_job(self.poll, "interval", seconds=monitor.interval_seconds,
                              args=[name], id=name, name=f"monitor {name}", next_run_time=now)
        scheduler.start()
        log.info("running %d monitor(s): %s", len(self.monitors), ", ".join(self.monitors))
        try:
            while not self.stop_event.wait(STOP_POLL_SECONDS):
                pass
        finally:
            log.info("stopping: letting the current batches finish")
            scheduler.shutdown(wait=True)
            self.release_leases()
            log.info("stopped")

    def preload_models(self) -> None:
        """Load each monitor's active model now, so that the first rows to arrive are
        not held up by loading it (and the deep-learning runtime, over a second). A
        failure here is left to the first batch to report."""
        for name in self.monitors:
            try:
                with self.engine.connect() as connection:
                    self.models.active(connection, name)
            except Exception as exc:
                log.debug("monitor %s: model not preloaded: %s", name,
                          describe_error(exc, self.engine.url))

    def stop(self) -> None:
        """Ask the daemon to stop after the current batches."""
        self.stop_event.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self.stop()

