"""The daemon: an APScheduler interval job per monitor, each a :class:`MonitorRunner` poll.

Each job (``max_instances=1``, coalesced) polls its monitor: batches until it is
caught up, its time budget is spent or a stop is requested (the runner handles
leases, errors, pauses and metrics); the other monitors keep running whatever
one of them does. SIGTERM and SIGINT let the current batch commit or roll back,
then the process exits 0; SIGHUP does the same, then ``run`` starts again in the
same process with the configuration read afresh (refused, and logged, while the new
configuration is invalid).
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings, Settings
from anomaly_monitor.cursors import worker_identity
from anomaly_monitor.db import describe_error
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.reading.cancel import QueryCanceller
from anomaly_monitor.registry import ModelCache
from anomaly_monitor.runner import (
    BACKOFF_INITIAL_SECONDS,
    BACKOFF_MAX_SECONDS,
    Clock,
    MonitorRunner,
    MonitorState,
    is_transient,
)

log = logging.getLogger(__name__)

#: Threads that run the monitors' polls (at most one per monitor).
MAX_THREADS = 8
#: How often the main thread checks for a stop request.
STOP_POLL_SECONDS = 0.5
#: On a stop, the running batches get this long to finish; then the queries they wait
#: for are cancelled (again every ``STOP_POLL_SECONDS`` until the jobs end).
STOP_GRACE_SECONDS = 3.0
#: Read paths: ``auto`` (Arrow for full windows where the driver has it), ``plain``.
READERS: tuple[str, ...] = ("auto", "plain")
#: ``run --once`` gives up on a monitor after this many consecutive failures.
ONCE_MAX_FAILURES = 3
#: A wall-clock step larger than this (seconds, against the monotonic clock, between
#: two stop checks) reschedules every monitor's next poll to now.
CLOCK_STEP_SECONDS = 2.0


#: After logging that a monitor's poll was skipped (the previous one still ran), the
#: scheduler's further such warnings for it are counted, and logged this often.
SKIPPED_LOG_SECONDS = 600.0


class SkippedRunFilter(logging.Filter):
    """Rate-limits APScheduler's "skipped: maximum number of running instances reached"
    warning (one per interval per monitor while a poll runs long, e.g. in a database
    outage): the first per monitor, then one every ``SKIPPED_LOG_SECONDS`` with the
    count of those left out."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.last: dict[str, float] = {}
        self.hidden: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if "maximum number of running instances" not in str(record.msg):
            return True
        job_arg = record.args[0] if isinstance(record.args, tuple) and record.args else None
        # The job's id: its str() carries its next run time, which changes every time.
        job = str(getattr(job_arg, "id", job_arg))
        now = self.clock()
        if job in self.last and now - self.last[job] < SKIPPED_LOG_SECONDS:
            self.hidden[job] = self.hidden.get(job, 0) + 1
            return False
        hidden = self.hidden.pop(job, 0)
        self.last[job] = now
        if hidden:
            record.msg = f"{record.msg} ({hidden} more since the last such warning)"
        return True


class ClockStepWatch:
    """Notices the wall clock stepping (an NTP correction, a resumed VM): the scheduler
    times its jobs by the wall clock, so a step back would hold every poll back by
    its size, and a step forward would fire a burst of missed runs."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.offset = clock.time() - clock.monotonic()

    def step(self) -> float:
        """Seconds the wall clock stepped since the last call (0 when within
        ``CLOCK_STEP_SECONDS``); negative for a step back."""
        offset = self.clock.time() - self.clock.monotonic()
        step, self.offset = offset - self.offset, offset
        return step if abs(step) > CLOCK_STEP_SECONDS else 0.0


def _cuda_available() -> bool:
    import torch  # the worker scores with it anyway

    return bool(torch.cuda.is_available())


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
        if reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}; got {reader!r}")
        self.settings = settings
        self.clock = clock or Clock()
        self.engine = engine
        self.metrics = metrics
        self.models = ModelCache(device, threads=threads)
        chosen = [settings.monitor(name) for name in monitors] if monitors else settings.monitors
        self.monitors: dict[str, MonitorSettings] = {m.name: m for m in chosen}
        self.stop_event = threading.Event()
        #: Set by SIGHUP (when ``check_reload`` accepts): the caller restarts the process.
        self.reload_requested = False
        self._hangup = False
        #: Called on SIGHUP before stopping; raises to refuse the reload (e.g. the new
        #: configuration is invalid), which is logged while the worker goes on.
        self.check_reload: Callable[[], None] | None = None
        self.owner = worker_identity()
        self.threads = max(1, min(len(chosen), MAX_THREADS))
        share = min(1.0, self.threads / max(1, len(chosen)))
        self.runners = {
            m.name: MonitorRunner(m, engine, metrics, self.models, owner=self.owner,
                                  clock=self.clock, stop_event=self.stop_event,
                                  use_arrow=reader == "auto", share=share)
            for m in chosen
        }
        metrics.init_monitors({m.name: m.interval_seconds for m in chosen},
                              windows={m.name for m in chosen if m.window is not None},
                              retraining={m.name for m in chosen if m.retrain is not None})
        if device != "cpu" and _cuda_available():
            metrics.init_cuda(m.name for m in chosen)

    @property
    def states(self) -> dict[str, MonitorState]:
        """Each monitor's state in this worker."""
        return {name: runner.state for name, runner in self.runners.items()}

    def poll(
        self, name: str, *, budget_seconds: float | None = None, max_failures: int | None = None
    ) -> MonitorState:
        """One poll of monitor ``name`` (see :meth:`MonitorRunner.poll`)."""
        return self.runners[name].poll(budget_seconds=budget_seconds,
                                       max_failures=max_failures)

    def release_leases(self) -> None:
        """Give up every held lease so that a standby worker takes over at once (and
        close the monitors' Arrow readers)."""
        for runner in self.runners.values():
            runner.release()

    # -- all monitors ---------------------------------------------------------------

    def run_once(self) -> dict[str, MonitorState]:
        """Process everything pending on every monitor once (``run --once``)."""
        for runner in self.runners.values():
            runner.lease_log_level = logging.DEBUG
            runner.retrainer.background = False  # a due retrain finishes before the exit
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
                if delay > BACKOFF_INITIAL_SECONDS:
                    log.info("database reachable again")
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
        """Let SIGTERM and SIGINT stop the worker after the current batch, and SIGHUP
        ask for a reload (:attr:`reload_requested`: stop the same way, then the caller
        starts afresh with the configuration read again).

        Returns a function that restores the previous handlers.
        """
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)

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
        skipped = SkippedRunFilter()
        logging.getLogger("apscheduler.scheduler").addFilter(skipped)
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(self.threads)},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
            timezone=dt.UTC,
        )
        now = dt.datetime.now(dt.UTC)
        for name, monitor in self.monitors.items():
            scheduler.add_job(self.poll, "interval", seconds=monitor.interval_seconds,
                              args=[name], id=name, name=f"monitor {name}", next_run_time=now)
        # Tracks the connections lent out from now on: a stop may cancel their queries.
        canceller = QueryCanceller(self.engine)
        scheduler.start()
        log.info("running %d monitor(s): %s", len(self.monitors), ", ".join(self.monitors))
        watch = ClockStepWatch(self.clock)
        try:
            while not self.stop_event.wait(STOP_POLL_SECONDS):
                step = watch.step()
                if step:
                    self._reschedule(scheduler, step)
                if self._hangup:
                    self._hangup = False
                    self._reload()
        finally:
            log.info("stopping: letting the current batches finish")
            self._shutdown(scheduler, canceller)
            canceller.close()
            self.release_leases()
            logging.getLogger("apscheduler.scheduler").removeFilter(skipped)
            log.info("stopped")

    def _shutdown(self, scheduler: Any, canceller: QueryCanceller) -> None:
        """Stop the scheduler, waiting for its running jobs; after ``STOP_GRACE_SECONDS``
        cancel the queries they still wait for (a slow read would hold the stop up
        for its whole statement timeout)."""
        done = threading.Thread(target=scheduler.shutdown, kwargs={"wait": True},
                                name="scheduler-shutdown")
        done.start()
        done.join(STOP_GRACE_SECONDS)
        if done.is_alive():
            log.warning("stopping: cancelling the queries still running after %.0f s",
                        STOP_GRACE_SECONDS)
        while done.is_alive():
            for runner in self.runners.values():
                runner.state.read_state.cancel()
            canceller.cancel()
            done.join(STOP_POLL_SECONDS)
        for runner in self.runners.values():
            runner.state.read_state.cancelled = False
            runner.retrainer.abandon()

    def _reschedule(self, scheduler: Any, step: float) -> None:
        log.warning("the wall clock stepped %s by %.0f s; polling every monitor now and "
                    "timing its interval from there", "back" if step < 0 else "forward",
                    abs(step))
        now = dt.datetime.now(dt.UTC)
        for name in self.monitors:
            try:
                scheduler.modify_job(name, next_run_time=now)
            except Exception as exc:  # a job that ended meanwhile (shutdown)
                log.debug("monitor %s: not rescheduled: %s", name, exc)

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
        self.reload_requested = False  # a stop wins over a reload asked for before it
        self.stop()

    def _on_hangup(self, _signum: int, _frame: FrameType | None) -> None:
        # Only a flag here: the main loop reads the configuration (not a signal handler).
        if not self.stop_event.is_set():
            self._hangup = True

    def _reload(self) -> None:
        """SIGHUP, in the main loop: stop for a restart if the new configuration holds."""
        if self.check_reload is not None:
            try:
                self.check_reload()
            except Exception as exc:
                log.error("received SIGHUP, but not reloading: %s; going on as before", exc)
                return
        if self.stop_event.is_set():
            return  # a SIGTERM came meanwhile: stop, not restart
        log.info("received SIGHUP: stopping after the current batches to start again with "
                 "the configuration read afresh")
        self.reload_requested = True
        self.stop()
