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
from dataclasses import dataclass
from types import FrameType

import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings, Settings
from anomaly_monitor.db import describe_error
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import RegistryError
from anomaly_monitor.scoring import (
    BatchConflictError,
    BatchResult,
    ModelCache,
    read_cursor,
    run_batch,
    set_paused,
)
from anomaly_monitor.source import SchemaError, SourceTable, count_after, reflect_source

log = logging.getLogger(__name__)

#: A job stops calling run_batch after this share of its interval (at least the minimum).
JOB_BUDGET_FRACTION = 0.9
MIN_JOB_BUDGET_SECONDS = 5.0
#: Retry delays after database errors: doubling from the initial value up to the cap.
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
#: How often the main thread checks for a stop request.
STOP_POLL_SECONDS = 0.5


@dataclass
class MonitorState:
    """What the worker knows about one monitor between jobs."""

    status: str = "starting"
    detail: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    source: SourceTable | None = None
    batches: int = 0
    rows: int = 0
    flagged: int = 0


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
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.models = ModelCache(device)
        chosen = [settings.monitor(name) for name in monitors] if monitors else settings.monitors
        self.monitors: dict[str, MonitorSettings] = {m.name: m for m in chosen}
        self.states = {name: MonitorState() for name in self.monitors}
        self.stop_event = threading.Event()
        metrics.init_monitors(self.monitors)

    # -- one monitor ------------------------------------------------------------------

    def _source(self, monitor: MonitorSettings) -> SourceTable:
        state = self.states[monitor.name]
        if state.source is None:
            with self.engine.connect() as connection:
                state.source = reflect_source(connection, monitor)
        return state.source

    def _pause(self, monitor: MonitorSettings, reason: str) -> None:
        state = self.states[monitor.name]
        state.status, state.detail, state.source = "paused", reason, None
        log.error("monitor %s paused: %s", monitor.name, reason)
        self.metrics.paused.labels(monitor.name).set(1)
        with self.engine.begin() as connection:
            set_paused(connection, monitor.name, reason)

    def _try_resume(self, monitor: MonitorSettings) -> bool:
        """Re-check a paused monitor's table and model; resume it when both are fine."""
        source = self._source(monitor)
        with self.engine.connect() as connection:
            model = self.models.active(connection, monitor.name)
        if model is not None:
            source.feature_columns(model.version.features)
        with self.engine.begin() as connection:
            set_paused(connection, monitor.name, None)
        log.info("monitor %s resumed", monitor.name)
        self.metrics.paused.labels(monitor.name).set(0)
        return True

    def _record(self, monitor: MonitorSettings, result: BatchResult) -> None:
        state = self.states[monitor.name]
        state.failures, state.detail = 0, None
        state.status = {"committed": "running", "idle": "running"}.get(result.status,
                                                                         result.status)
        if result.status == "no_model":
            state.detail = f"no active model; run: anomaly-monitor train {monitor.name}"
        if result.status == "committed":
            state.batches += 1
            state.rows += result.rows
            state.flagged += result.flagged
            self.metrics.observe_batch(result)
            log.info("monitor %s: ids %s-%s, %d rows, %d flagged, %d quarantined (%.3f s)",
                     monitor.name, result.first_id, result.last_id, result.rows,
                     result.flagged, result.quarantined, result.duration_seconds)

    def _failed(self, monitor: MonitorSettings, exc: BaseException) -> float:
        """Count a failed batch; returns the backoff delay in seconds."""
        state = self.states[monitor.name]
        state.failures += 1
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_INITIAL_SECONDS * 2 ** (state.failures - 1))
        state.status = "error"
        state.detail = describe_error(exc, self.engine.url)
        state.retry_at = time.monotonic() + delay
        state.source = None
        self.metrics.observe_error(monitor.name)
        log.warning("monitor %s: batch failed (%s); retrying in %.0f s",
                    monitor.name, state.detail, delay)
        return delay

    def _step(self, monitor: MonitorSettings) -> BatchResult | None:
        """One batch with its error handling; ``None`` after a failure or a pause."""
        state = self.states[monitor.name]
        try:
            if state.status == "paused" and not self._try_resume(monitor):
                return None
            result = run_batch(self.engine, monitor, self._source(monitor), self.models)
        except (SchemaError, RegistryError) as exc:
            self._pause(monitor, str(exc))
            return None
        except BatchConflictError as exc:
            log.warning("%s", exc)
            return None
        except Exception as exc:  # the daemon never dies on data or the DB
            if not isinstance(exc, sa.exc.SQLAlchemyError):
                log.exception("monitor %s: unexpected error", monitor.name)
            self._failed(monitor, exc)
            return None
        if result.status == "paused":
            state.status = "paused"
            with self.engine.connect() as connection:
                cursor = read_cursor(connection, monitor.name)
            state.detail = cursor.pause_reason if cursor else None
            return result
        self._record(monitor, result)
        return result

    def poll(self, name: str, *, budget_seconds: float | None = None) -> MonitorState:
        """Run batches for monitor ``name`` until caught up, out of budget, or stopped."""
        monitor = self.monitors[name]
        state = self.states[name]
        if budget_seconds is None:
            budget_seconds = max(MIN_JOB_BUDGET_SECONDS,
                                 JOB_BUDGET_FRACTION * monitor.interval_seconds)
        deadline = time.monotonic() + budget_seconds
        last: BatchResult | None = None
        while not self.stop_event.is_set():
            wait = state.retry_at - time.monotonic()
            if wait > 0 and (time.monotonic() + wait > deadline or self.stop_event.wait(wait)):
                break
            result = self._step(monitor)
            if result is None:
                if state.status == "paused":
                    break
                continue
            last = result
            if result.caught_up or time.monotonic() >= deadline:
                break
        if last is not None and last.status in ("committed", "idle"):
            self._report_poll(monitor, last)
        return state

    def _report_poll(self, monitor: MonitorSettings, last: BatchResult) -> None:
        try:
            with self.engine.connect() as connection:
                cursor = read_cursor(connection, monitor.name)
                backlog = (count_after(connection, self._source(monitor), cursor.position)
                           if cursor else None)
                model = self.models.active(connection, monitor.name)
        except Exception as exc:  # metrics must not kill the job
            self._failed(monitor, exc)
            return
        newest = last.newest_timestamp.timestamp() if last.newest_timestamp else None
        self.metrics.observe_poll(monitor.name, now=time.time(), backlog=backlog,
                                  newest_timestamp=newest)
        self.metrics.paused.labels(monitor.name).set(0)
        if model is not None:
            self.metrics.set_model(monitor.name, str(model.version.version),
                                   model.version.kind, model.version.threshold)

    # -- all monitors ---------------------------------------------------------------

    def run_once(self) -> dict[str, MonitorState]:
        """Process everything pending on every monitor once (``run --once``)."""
        for name in self.monitors:
            self.poll(name, budget_seconds=float("inf"))
            state = self.states[name]
            while state.status == "error" and state.failures < 3 and not self.stop_event.is_set():
                self.poll(name, budget_seconds=float("inf"))
        return self.states

    def run_forever(self, *, install_signals: bool = True) -> None:
        """Schedule every monitor and block until SIGTERM/SIGINT or :meth:`stop`."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
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
            log.info("stopped")

    def stop(self) -> None:
        """Ask the daemon to stop after the current batches."""
        self.stop_event.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self.stop()

