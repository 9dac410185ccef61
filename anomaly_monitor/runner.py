"""One monitor in a worker: its state, and a poll of batches around :func:`run_batch`.

A :class:`MonitorRunner` holds the lease, runs batches until the monitor is
caught up or its budget is spent, sweeps late rows and reports the poll's
metrics. Database errors are logged, counted and retried with capped
exponential backoff; a monitor whose table, columns or model are wrong is paused
with the reason (shown by ``status``) and resumes by itself once the problem is
fixed. Its state is a :class:`Status`; time comes from an injected
:class:`Clock`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import sqlalchemy as sa

from anomaly_monitor.batch import (
    BatchResult,
    ReadState,
    probe_next_id,
    run_batch,
    sweep_late_rows,
)
from anomaly_monitor.below import BELOW_CHECK_SECONDS, BELOW_COUNT_TIMEOUT_MS, measure_below
from anomaly_monitor.config import MonitorSettings, lease_duration
from anomaly_monitor.cursors import (
    BatchConflictError,
    Lease,
    claim,
    forget_standby,
    note_standby,
    read_cursor,
    release,
    set_paused,
)
from anomaly_monitor.db import describe_error
from anomaly_monitor.drift import DriftReport, stored_report
from anomaly_monitor.feedback import feedback_counts, recent_precision
from anomaly_monitor.incidents import alerting_incidents, open_count
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import ModelCache, RegistryError
from anomaly_monitor.retraining import Retrainer
from anomaly_monitor.scoring import check_features
from anomaly_monitor.source import (
    RESTARTED,
    SLOW_READ,
    IdsRestartedError,
    SchemaError,
    SlowReadError,
    SourceTable,
    check_position,
    count_after,
    reflect_source,
)
from anomaly_monitor.tables import as_utc, batches, utcnow

# The daemon's log lines keep the logger name operators filter on.
log = logging.getLogger("anomaly_monitor.worker")

#: A job stops calling run_batch after this share of its interval (at least the minimum);
#: when more monitors than threads share a worker, both are scaled by its share of the
#: threads, so that a backlog in some does not starve the others' polls (a poll still
#: runs at least one batch).
JOB_BUDGET_FRACTION = 0.9
MIN_JOB_BUDGET_SECONDS = 5.0
#: Retry delays after database errors: doubling from the initial value up to the cap.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
#: An error that is not a lost connection (a constraint, a missing table, a bug) pauses
#: the monitor after this many consecutive failures instead of being retried forever.
PAUSE_AFTER_FAILURES = 5
#: A running worker reflects its monitor's table again this often (seconds), so that a
#: column changed under it (e.g. to TEXT) pauses it as it would pause a fresh worker.
REFLECT_SECONDS = 60.0


def renew_period(monitor: MonitorSettings) -> float:
    """Seconds between a live leader's lease renewals at most (one batch aside): it
    renews at the start of every poll and every third of the lease within one."""
    return max(monitor.interval_seconds, lease_duration(monitor) / 3)


def _when(moment: dt.datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z" if moment is not None else "it is released"


#: SQLSTATE classes of a rejected login (28) or a database that does not exist (3D).
CONFIGURATION_SQLSTATES = ("28", "3D")
#: The same, as libpq words them when the server gives no SQLSTATE (at connect).
CONFIGURATION_MESSAGES = ("password authentication failed", "no pg_hba.conf entry",
                          "does not exist", "invalid value for parameter",
                          "unrecognized configuration parameter", "invalid sslmode value",
                          "invalid connection option", "invalid integer value")


def is_configuration_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a rejected password or user, or a missing database: to be
    fixed in the configuration, not waited out like an outage."""
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str) and state[:2] in CONFIGURATION_SQLSTATES:
        return True
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    text = str(orig or exc).lower()
    return any(words in text for words in CONFIGURATION_MESSAGES) and (
        "does not exist" not in text or "database" in text or "role" in text)


def pause_cause(exc: BaseException) -> str:
    """The bounded cause (one of :data:`~anomaly_monitor.metrics.PAUSE_CAUSES`) of a
    pause for ``exc``: the ``cause`` label of ``anomaly_monitor_pause_info``."""
    if isinstance(exc, IdsRestartedError):
        return "ids_restarted"
    if isinstance(exc, SlowReadError):
        return "slow_reads"
    if isinstance(exc, RegistryError):
        return "model"
    if isinstance(exc, SchemaError):
        return "schema"
    return "repeated_failures"


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a lost or refused connection, worth retrying forever."""
    if is_configuration_error(exc):
        return False
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError
                      | sa.exc.DisconnectionError | sa.exc.TimeoutError | OSError)


#: A standby row not renewed for this many lease durations is deleted (its worker died).
STANDBY_FORGET_LEASES = 10
#: How the reason of a pause after repeated failures begins.
REPEATED_FAILURES = "repeated failures"


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
    reflected_at: float = 0.0
    #: When the late-row sweep last ran (database rows' ``started_at`` clock).
    swept_at: dt.datetime | None = None
    batches: int = 0
    rows: int = 0
    flagged: int = 0
    quarantined: int = 0
    newest_timestamp: dt.datetime | None = None
    lease: Lease | None = None
    lease_renewed: float = 0.0
    #: The lease holder this standby last logged that it waits for.
    waiting_for: str | None = None
    #: The reason of a repeated-failures pause lifted to try a batch again; ``None``
    #: once a batch succeeds.
    retrying_pause: str | None = None
    #: When this worker last recorded itself as a standby (monotonic); ``None``: no row.
    standby_noted: float | None = None
    #: The (version, threshold) last published to the model metrics.
    reported_model: tuple[int, float] | None = None
    read_state: ReadState = field(default_factory=ReadState)
    #: When the rows below the cursor are counted next (``Clock.monotonic``: at the
    #: first poll), and the last count.
    below_check_at: float = 0.0
    rows_below: int = 0
    #: Whether a count of the rows below the cursor timed out (said once).
    below_unmeasured: bool = False
    #: Seconds the last batch took (whether the next may read ahead).
    last_batch_seconds: float = 0.0
    #: Whether the newest scored timestamp was looked up in am_batches (after a start).
    looked_up_newest: bool = False
    #: The drift of the last batch that measured it (what a drift retrain is judged on).
    drift: DriftReport | None = None
    #: The CUDA out-of-memory counts of the monitor's detectors at the last batch.
    oom_seen: dict[str, int] = field(default_factory=dict)


class MonitorRunner:
    """Runs one monitor's polls for a worker (``owner`` is the worker's lease identity)."""

    def __init__(
        self,
        monitor: MonitorSettings,
        engine: sa.Engine,
        metrics: Metrics,
        models: ModelCache,
        *,
        owner: str,
        clock: Clock,
        stop_event: threading.Event,
        use_arrow: bool = True,
        share: float = 1.0,
        background_retrains: bool = True,
    ) -> None:
        self.monitor = monitor
        #: This monitor's share of the worker's threads (1: a thread of its own); below 1
        #: its polls are shorter and its Arrow reader is closed after each one, so that
        #: the worker holds at most a connection per thread, not one per monitor.
        self.share = share
        #: The level of the "lease acquired" line (DEBUG for ``run --once``, from cron).
        self.lease_log_level = logging.INFO
        self.engine = engine
        self.metrics = metrics
        self.models = models
        self.owner = owner
        self.clock = clock
        self.stop_event = stop_event
        self.state = MonitorState(read_state=ReadState(use_arrow=use_arrow))
        self.retrainer = Retrainer(monitor, engine, metrics, time_now=clock.time,
                                   background=background_retrains, device=models.device)

    def release(self) -> None:
        """Give up the lease, if held, so that a standby takes over at once (and close
        the Arrow reader); a standby no longer shows as one."""
        state = self.state
        state.read_state.close()
        self._forget_standby()
        if state.lease is None:
            return
        try:
            with self.engine.begin() as connection:
                release(connection, state.lease)
        except Exception as exc:  # the lease then simply expires
            log.warning("could not release the lease on %s: %s", state.lease.monitor,
                        describe_error(exc, self.engine.url))
        state.lease = None

    def _source(self) -> SourceTable:
        """The monitor's reflected table, reflected again every ``REFLECT_SECONDS`` so
        that a running worker notices a changed table as a fresh one would."""
        monitor = self.monitor
        state = self.state
        now = self.clock.monotonic()
        if state.source is None or now - state.reflected_at >= REFLECT_SECONDS:
            with self.engine.connect() as connection:
                state.source = reflect_source(connection, monitor)
            state.reflected_at = now
        return state.source

    def _pause(self, reason: str, cause: str) -> bool:
        """Pause the monitor with ``reason``: logged and written once, not again while
        it stays paused for the same reason. ``False`` when the pause cannot be written
        (the monitor is then failing, retried after an interval: not shown as paused
        where ``status`` cannot show it)."""
        monitor = self.monitor
        state = self.state
        again = state.status == Status.PAUSED and state.detail == reason
        # Paused again after a retry of the same repeated failures: written, not logged.
        retried = state.retrying_pause == reason
        state.read_state.close()
        if again:
            state.source = None
            self.metrics.set_paused(monitor.name, True, cause, reason)
            return True
        if cause == "ids_restarted" and not retried:
            self.metrics.observe_id_restart(monitor.name)
        try:
            with self.engine.begin() as connection:
                set_paused(connection, monitor.name, reason)
        except Exception as exc:  # e.g. a user without UPDATE on am_cursors
            log.error("monitor %s: could not record its pause (%s): %s", monitor.name,
                      describe_error(exc, self.engine.url), reason)
            state.status, state.detail, state.source = Status.ERROR, reason, None
            state.failures += 1  # run --once gives up after its maximum
            state.retry_at = self.clock.monotonic() + monitor.interval_seconds
            self.metrics.observe_error(monitor.name)
            return False
        state.status, state.detail, state.source = Status.PAUSED, reason, None
        self.metrics.set_paused(monitor.name, True, cause, reason)
        log.log(logging.DEBUG if retried else logging.ERROR, "monitor %s paused: %s",
                monitor.name, reason)
        return True

    def _try_resume(self) -> None:
        """Re-check a paused monitor's table and model; resume it when both are fine
        (a problem raises, and the monitor stays paused). A pause for restarted ids
        stays until an operator moves the cursor (``anomaly-monitor cursor``)."""
        monitor = self.monitor
        with self.engine.connect() as connection:
            cursor = read_cursor(connection, monitor.name)
        reason = (cursor.pause_reason or "") if cursor is not None else ""
        if reason.startswith(RESTARTED):
            raise IdsRestartedError(reason)
        source = self._source()
        if cursor is not None and reason.startswith(SLOW_READ):
            self._probe(source, cursor.position)
        with self.engine.connect() as connection:
            model = self.models.active(connection, monitor.name)
        if model is not None:
            check_features(monitor, model.version)
            source.feature_columns(model.version.features)
        with self.engine.connect() as connection:
            if cursor is not None:  # ids that restarted while it was paused for another cause
                check_position(connection, source, cursor.position, cursor.position_timestamp,
                               caught_up=True)
        with self.engine.begin() as connection:
            set_paused(connection, monitor.name, None)
        if reason.startswith(REPEATED_FAILURES):
            # Nothing to re-check but the batch itself: tried once per interval, quietly
            # after the first time; a success resumes the monitor for good (_record).
            first = self.state.retrying_pause != reason
            self.state.retrying_pause = reason
            log.log(logging.INFO if first else logging.DEBUG,
                    "monitor %s: trying a batch again after repeated failures", monitor.name)
        else:
            log.info("monitor %s resumed", monitor.name)
        self.metrics.set_paused(monitor.name, False)
        # A pause for the same reason right after is written (and logged) again.
        self.state.status, self.state.detail = Status.RUNNING, None

    def _probe(self, source: SourceTable, position: int) -> None:
        """Raise :class:`SlowReadError` while the id after ``position`` still cannot be
        read within the statement timeout."""
        probe_next_id(self.engine, source, position, stopping=self.stop_event.is_set)

    def _record(self, result: BatchResult) -> None:
        monitor = self.monitor
        state = self.state
        if state.failures:
            log.info("monitor %s: working again after %d failed attempt(s)", monitor.name,
                     state.failures)
        if state.retrying_pause is not None:
            log.info("monitor %s resumed: a batch succeeded after repeated failures",
                     monitor.name)
            state.retrying_pause = None
        state.failures, state.detail = 0, None
        state.status = Status.RUNNING if result.status in ("committed", "idle", "slow") \
            else Status(result.status)
        if result.status == "slow":
            state.detail = (f"a read ran past the statement timeout; reading "
                            f"{state.read_state.slow_rows} row(s) per window")
        if result.status == "no_model":
            state.detail = f"no active model; run: anomaly-monitor train {monitor.name}"
        version = result.version
        # Before the batch's counters, so that scrapes see both; only when the version or
        # its threshold changed (the expected ratio is computed from its severity scale).
        if version is not None and state.reported_model != (version.version, version.threshold):
            self.metrics.set_model(monitor.name, str(version.version), version.kind,
                                   version.threshold, version.expected_ratio())
            if state.reported_model is not None:  # not at start: a switch worth a line
                log.info("monitor %s: now scoring with version %d, threshold %.6g (was "
                         "version %d, threshold %.6g)", monitor.name, version.version,
                         version.threshold, *state.reported_model)
            state.reported_model = (version.version, version.threshold)
        if result.drift is not None:
            state.drift = result.drift
        self._count_cuda_oom()
        if result.status == "committed":
            state.batches += 1
            state.rows += result.rows
            state.flagged += result.flagged
            state.quarantined += result.quarantined
            self.metrics.observe_batch(result)
            log.info("monitor %s: ids %s-%s, %d rows, %d flagged, %d quarantined (%.3f s)",
                     monitor.name, result.first_id, result.last_id, result.rows,
                     result.flagged, result.quarantined, result.duration_seconds)

    def _count_cuda_oom(self) -> None:
        """Count the CUDA out-of-memory events of the monitor's detectors since the last
        batch (a detector loaded anew starts from 0)."""
        counts = self.models.oom_counts(self.monitor.name)
        seen = self.state.oom_seen
        delta = {a: n - seen.get(a, 0) if n >= seen.get(a, 0) else n for a, n in counts.items()}
        self.state.oom_seen = counts
        self.metrics.observe_cuda_oom(self.monitor.name, delta)

    def _failed(self, exc: BaseException) -> float:
        """Count a failed batch; returns the backoff delay in seconds.

        A persistent error that is not a lost connection pauses the monitor.
        """
        monitor = self.monitor
        state = self.state
        if self.stop_event.is_set() and state.read_state.cancelled:
            return 0.0  # cancelled to stop: no failure (the process is ending)
        state.failures += 1
        if state.failures >= PAUSE_AFTER_FAILURES and not is_transient(exc):
            # The same text at every retry: one pause, one log line, one metric series.
            reason = (f"{REPEATED_FAILURES} ({PAUSE_AFTER_FAILURES} or more in a row): "
                      f"{describe_error(exc, self.engine.url)}")
            if not self._pause(reason, "repeated_failures"):  # counted as an error there
                return monitor.interval_seconds
            self.metrics.observe_error(monitor.name)
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

    def _step(self, first_try: bool = True) -> BatchResult | None:
        """One batch with its error handling; ``None`` after a failure or a pause."""
        monitor = self.monitor
        state = self.state
        try:
            if state.status == Status.PAUSED:
                self._try_resume()
            result = run_batch(self.engine, monitor, self._source(), self.models,
                               lease=state.lease, read_state=state.read_state)
        except (SchemaError, RegistryError) as exc:
            self._pause(str(exc), pause_cause(exc))
            return None
        except BatchConflictError as exc:
            log.warning("%s", exc)
            state.lease = None  # claim again (or stand by) at the next poll
            state.status = Status.STANDBY
            state.read_state.close()
            state.read_state.open_gaps = None  # another holder may have left some
            return None
        except Exception as exc:  # the daemon never dies on data or the DB
            if self.stop_event.is_set() and state.read_state.cancelled:
                log.info("monitor %s: batch cancelled to stop; it is read again after "
                         "the restart", monitor.name)
                return None
            if not isinstance(exc, sa.exc.SQLAlchemyError):
                # Once, not at every retry of a monitor paused for repeated failures.
                log.log(logging.DEBUG if state.retrying_pause else logging.ERROR,
                        "monitor %s: unexpected error", monitor.name, exc_info=True)
            self._failed(exc)
            return None
        if result.status == "paused":
            # Paused by an earlier process: re-check now rather than an interval later.
            state.status = Status.PAUSED
            with self.engine.connect() as connection:
                cursor = read_cursor(connection, monitor.name)
            state.detail = cursor.pause_reason if cursor else None
            return self._step(first_try=False) if first_try else result
        self._record(result)
        return result

    def poll(
        self, *, budget_seconds: float | None = None, max_failures: int | None = None
    ) -> MonitorState:
        """Run batches until caught up, out of budget, stopped, or (with
        ``max_failures``) failed that many times in a row."""
        try:
            return self._poll(budget_seconds, max_failures)
        finally:
            if self.share < 1:
                self.state.read_state.close()
            else:
                self.state.read_state.close_idle()

    def _poll(self, budget_seconds: float | None, max_failures: int | None) -> MonitorState:
        monitor, state = self.monitor, self.state
        if budget_seconds is None:
            budget_seconds = self.share * max(MIN_JOB_BUDGET_SECONDS,
                                              JOB_BUDGET_FRACTION * monitor.interval_seconds)
        clock = self.clock.monotonic
        deadline = clock() + budget_seconds
        last: BatchResult | None = None
        first = True
        while not self.stop_event.is_set():
            wait = state.retry_at - clock()
            if wait > 0 and (clock() + wait > deadline or self.stop_event.wait(wait)):
                break
            if not self._hold_lease(renew=first):
                break
            first = False
            # A reader closed after this poll: no read-ahead for a batch that may be its last.
            state.read_state.read_ahead = self.share >= 1 or \
                clock() + 2 * state.last_batch_seconds < deadline
            result = self._step()
            if result is None:
                if state.status in (Status.PAUSED, Status.STANDBY) or (
                        max_failures is not None and state.failures >= max_failures):
                    break
                continue
            last = result
            state.last_batch_seconds = result.duration_seconds
            if result.caught_up or clock() >= deadline:
                break
        # Not after a pause, a lost lease or a failure ended the poll: the sweep would
        # fail on the fence, and the backlog would be counted from a stale position.
        if last is not None and last.status in ("committed", "idle") \
                and state.status == Status.RUNNING and state.lease is not None \
                and not self.stop_event.is_set():
            count_below = clock() >= state.below_check_at
            # All open gaps first, so that late rows are not counted as written below.
            if self._sweep(last, full=count_below) and count_below:
                state.below_check_at = clock() + BELOW_CHECK_SECONDS
                self._count_below()
            self._report_poll(last)
            self.retrainer.after_poll(state.lease, state.drift)
        return state

    def _hold_lease(self, *, renew: bool = False) -> bool:
        """Claim or renew the monitor's lease (when ``renew``, at the start of each poll,
        and a third of its duration after the last renewal); ``False`` while another
        worker holds it or the database fails."""
        monitor = self.monitor
        state = self.state
        seconds = lease_duration(monitor)
        since = self.clock.monotonic() - state.lease_renewed
        if state.lease is not None and not renew and since < seconds / 3:
            return True
        try:
            with self.engine.begin() as connection:
                result = claim(connection, monitor.name, self.owner, seconds, state.lease,
                               renew_period=renew_period(monitor))
        except Exception as exc:  # a database error: retried with backoff
            self._failed(exc)
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
                state.read_state.open_gaps = None  # the new holder may leave some
            elif state.waiting_for != result.holder:  # once per leader, not every poll
                log.info("monitor %s: standing by; %s holds the lease until %s (database "
                         "clock)", monitor.name, result.holder, _when(result.expires_at))
            state.lease, state.status, state.waiting_for = None, Status.STANDBY, result.holder
            self._note_standby(seconds)
            self.metrics.set_rows_below(monitor.name, 0)  # the leader reports it
            self.metrics.set_paused(monitor.name, False)  # and its pause, if any
            self.metrics.set_incidents(monitor.name, 0, ())  # and the open incidents
            self.metrics.clear_drift(monitor.name)  # and the drift
            # What this worker measured as leader is stale when it leads again.
            state.rows_below, state.below_check_at = 0, 0.0
            state.newest_timestamp, state.looked_up_newest = None, False
            state.drift = None
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
        elif state.lease is not None and state.lease.token != result.lease.token:
            log.warning("monitor %s: this worker's lease was reset (the cursor was moved, "
                        "anomaly-monitor cursor); claimed it again (token %d)", monitor.name,
                        result.lease.token)
        elif state.lease is None:  # every run of run --once: not worth an INFO line there
            log.log(self.lease_log_level, "monitor %s: lease acquired (token %d)",
                    monitor.name, result.lease.token)
        state.waiting_for = None
        self._forget_standby()
        if state.lease is None or state.lease.token != result.lease.token:
            state.read_state.open_gaps = None  # not a renewal: another holder may have left some
        state.lease, state.lease_renewed = result.lease, self.clock.monotonic()
        return True

    def _note_standby(self, lease_seconds: float) -> None:
        """Record this worker as a standby (``status`` lists it), at most every third
        of the lease's duration; a report, never a failure of the poll."""
        state = self.state
        now = self.clock.monotonic()
        if state.standby_noted is not None and now - state.standby_noted < lease_seconds / 3:
            return
        try:
            with self.engine.begin() as connection:
                note_standby(connection, self.monitor.name, self.owner,
                             STANDBY_FORGET_LEASES * lease_seconds)
        except Exception as exc:
            log.debug("monitor %s: could not record this standby (%s)", self.monitor.name,
                      describe_error(exc, self.engine.url))
            return
        state.standby_noted = now

    def _forget_standby(self) -> None:
        """Remove this worker's standby row, if it wrote one (it leads, or it stops)."""
        state = self.state
        if state.standby_noted is None:
            return
        try:
            with self.engine.begin() as connection:
                forget_standby(connection, self.monitor.name, self.owner)
        except Exception as exc:  # it ages out of status after a lease duration
            log.debug("monitor %s: could not remove this standby (%s)", self.monitor.name,
                      describe_error(exc, self.engine.url))
        state.standby_noted = None

    def _count_below(self) -> None:
        """Count the rows written below the cursor (:func:`measure_below`); warn when
        there are more than at the last count."""
        monitor, state = self.monitor, self.state
        try:
            with self.engine.begin() as connection:
                rows = measure_below(connection, self._source(), monitor.name, utcnow())
        except Exception as exc:  # a report, not a batch: never fails the poll
            log.warning("monitor %s: could not count the rows below the cursor (%s)",
                        monitor.name, describe_error(exc, self.engine.url))
            return
        if rows is None:
            if not state.below_unmeasured:
                state.below_unmeasured = True
                log.info("monitor %s: the rows at or below the cursor could not be counted "
                         "within %d ms; rows written below it are not measured now (tried "
                         "again every %.0f s)", monitor.name, BELOW_COUNT_TIMEOUT_MS,
                         BELOW_CHECK_SECONDS)
            return
        state.below_unmeasured = False
        if rows > state.rows_below:
            log.warning("monitor %s: at least %d row(s) were written below the cursor and are "
                        "not scored; score them with: anomaly-monitor backfill %s --from-id A "
                        "--to-id B", monitor.name, rows, monitor.name)
        state.rows_below = rows
        self.metrics.set_rows_below(monitor.name, rows)

    def _sweep(self, last: BatchResult, *, full: bool = False) -> bool:
        """Score late rows behind the cursor, at the position and version ``last`` read
        (``full``: every open gap, not only those due); whether it went through."""
        monitor = self.monitor
        state = self.state
        if state.lease is None:
            return False
        known = (last.position, last.generation, last.version) \
            if last.position is not None and last.version is not None else None
        started = utcnow()
        try:
            late = sweep_late_rows(self.engine, monitor, self._source(), self.models,
                                   lease=state.lease, known=known,
                                   since=None if full else state.swept_at,
                                   clock=lambda: started, read_state=state.read_state)
            state.swept_at = started
        except Exception as exc:  # the sweep must not kill the job
            self._failed(exc)
            return False
        if late is not None:
            self._record(late)
            self.metrics.observe_late_rows(monitor.name, late.rows)
        return True

    def _report_poll(self, last: BatchResult) -> None:
        monitor = self.monitor
        try:
            # The poll's last batch read the cursor and the version: not read again.
            backlog = 0 if last.nothing_after else None
            if backlog is None and last.position is not None:
                with self.engine.connect() as connection:
                    backlog = count_after(connection, self._source(), last.position)
        except Exception as exc:  # metrics must not kill the job, nor count as a failed batch
            log.warning("monitor %s: could not measure the backlog (%s)", monitor.name,
                        describe_error(exc, self.engine.url))
            return
        self._report_incidents()
        state = self.state
        if last.newest_timestamp is not None:
            state.newest_timestamp = last.newest_timestamp
        elif state.newest_timestamp is None and not state.looked_up_newest:
            state.newest_timestamp = self._newest_scored()  # once, after a restart
            state.looked_up_newest = True
            self._restore_drift(last)
        newest = state.newest_timestamp.timestamp() if state.newest_timestamp else None
        self.metrics.observe_poll(monitor.name, now=self.clock.time(), backlog=backlog,
                                  newest_timestamp=newest)
        self.metrics.set_paused(monitor.name, False)

    def _report_incidents(self) -> None:
        """Publish the open incidents (the alert's series) and the operators' feedback,
        read from the database."""
        monitor = self.monitor
        try:
            with self.engine.connect() as connection:
                open_now = open_count(connection, monitor.name)
                alerting = alerting_incidents(connection, monitor.name,
                                              monitor.incidents.alert_severity, utcnow())
                counts = feedback_counts(connection, monitor.name)
                precision, _ = recent_precision(connection, monitor.name)
        except Exception as exc:  # metrics must not kill the job, nor count as a failed batch
            log.warning("monitor %s: could not read the open incidents and feedback (%s)",
                        monitor.name, describe_error(exc, self.engine.url))
            return
        self.metrics.set_incidents(monitor.name, open_now, alerting)
        self.metrics.set_feedback(monitor.name, counts, precision)

    def _restore_drift(self, last: BatchResult) -> None:
        """Publish the drift the last batch stored (after a restart or a takeover), so
        that the gauges and their alert do not fall to 0 until a batch comes."""
        try:
            with self.engine.connect() as connection:
                stored = stored_report(connection, self.monitor.name)
        except sa.exc.SQLAlchemyError as exc:  # a report: never the poll's failure
            log.warning("monitor %s: could not read the stored drift (%s)", self.monitor.name,
                        describe_error(exc, self.engine.url))
            return
        if stored is not None and last.version is not None and \
                stored[0].get("version") == last.version.version:
            self.state.drift = DriftReport.from_dict(stored[0])
            self.metrics.set_drift(self.monitor.name, self.state.drift)

    def _newest_scored(self) -> dt.datetime | None:
        """The newest source timestamp of the monitor's last batch (after a restart)."""
        monitor = self.monitor
        with self.engine.connect() as connection:
            value = connection.execute(
                sa.select(batches.c.newest_timestamp).where(batches.c.monitor == monitor.name)
                .order_by(batches.c.id.desc()).limit(1)
            ).scalar()
        return as_utc(value)
