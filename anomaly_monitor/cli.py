"""The ``anomaly-monitor`` command line (Click).

Exit codes: 0 success, 1 failure, 2 bad usage or configuration. Errors are one
line on stderr, never a traceback, and never contain the database password.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import sqlalchemy as sa

from anomaly_monitor import __version__
from anomaly_monitor.calibration import DEFAULT_METHOD
from anomaly_monitor.config import (
    EXAMPLE,
    SCORING_THREADS,
    THRESHOLD_METHODS,
    ConfigError,
    MonitorSettings,
    Settings,
    ThresholdSettings,
    check_model_params,
    config_path,
    load_settings,
)
from anomaly_monitor.db import (
    DatabaseError,
    DatabaseURLError,
    create_engine,
    describe_error,
    redact,
)
from anomaly_monitor.tables import as_utc

if TYPE_CHECKING:
    from anomaly_monitor.lifecycle import CalibrationPlan

EXIT_FAILURE = 1
EXIT_USAGE = 2
DATETIME_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]


class CliError(click.ClickException):
    """A one-line error with an exit code (1 failure, 2 usage/config)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _translate(exc: Exception, url: str | None) -> CliError | None:
    """Map a known exception to a :class:`CliError`, ``None`` for unknown ones."""
    from anomaly_monitor.lifecycle import TrainingError
    from anomaly_monitor.registry import RegistryError
    from anomaly_monitor.source import SchemaError

    if isinstance(exc, ConfigError | SchemaError | DatabaseURLError):
        return CliError(str(exc), EXIT_USAGE)
    if type(exc).__module__.startswith("alembic") and type(exc).__name__ == "CommandError":
        return CliError(f"migration: {exc}", EXIT_USAGE)
    if isinstance(exc, RegistryError | TrainingError | DatabaseError):
        return CliError(str(exc))
    if isinstance(exc, sa.exc.SQLAlchemyError):
        where = f" ({redact(url)})" if url else ""
        return CliError(f"database error{where}: {describe_error(exc, url)}")
    if isinstance(exc, ValueError | OSError):
        return CliError(str(exc))
    return None


class App:
    """Per-invocation state: the settings and the engine, created on first use."""

    def __init__(self, config: str | None) -> None:
        self.config = config
        self._settings: Settings | None = None
        self._engine: sa.Engine | None = None

    @property
    def settings(self) -> Settings:
        """The validated configuration."""
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings

    @property
    def engine(self) -> sa.Engine:
        """The database engine of the configured URL."""
        if self._engine is None:
            self._engine = create_engine(self.settings.database_url)
        return self._engine

    @property
    def url(self) -> str | None:
        """The database URL when the settings are loaded (for redacted messages)."""
        return self._settings.database_url if self._settings else None

    def monitor(self, name: str | None) -> MonitorSettings:
        """The named monitor, or the only one when ``name`` is ``None``."""
        if name is not None:
            return self.settings.monitor(name)
        if len(self.settings.monitors) != 1:
            raise CliError("several monitors are configured; name one with --monitor",
                           EXIT_USAGE)
        return self.settings.monitors[0]

    def close(self) -> None:
        """Release the engine's connections."""
        if self._engine is not None:
            self._engine.dispose()


class Group(click.Group):
    """Turns known exceptions into one-line errors with the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, translating errors."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            app = ctx.obj if isinstance(ctx.obj, App) else None
            translated = _translate(exc, app.url if app else None)
            if translated is None:
                raise CliError(f"unexpected {type(exc).__name__}: {exc}") from None
            raise translated from None
        finally:
            if isinstance(ctx.obj, App):
                ctx.obj.close()


pass_app = click.make_pass_decorator(App)


class UtcFormatter(logging.Formatter):
    """Log times in UTC, ISO 8601 with a ``Z``, like every other time this program shows."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


@click.group(cls=Group)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="Config file (default: $ANOMALY_MONITOR_CONFIG or ./anomaly-monitor.toml).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="anomaly-monitor")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbose: int) -> None:
    """Watch SQL tables for anomalous rows with autoencoder detectors."""
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # APScheduler logs every job run at INFO; keep that for -vv.
    for noisy in ("apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    # SQL statements and their parameters only at -vvv.
    logging.getLogger("sqlalchemy").setLevel(logging.INFO if verbose >= 3 else logging.WARNING)
    ctx.obj = App(config)


@main.command()
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_context
def init(ctx: click.Context, force: bool) -> None:
    """Write a commented example configuration."""
    path = config_path(ctx.find_object(App).config)
    if path.exists() and not force:
        raise CliError(f"{path} already exists (use --force to overwrite)")
    path.write_text(EXAMPLE, encoding="utf-8")
    click.echo(f"wrote {path}; edit it, then run: anomaly-monitor db upgrade")


# -- db ---------------------------------------------------------------------------------

@main.group(cls=Group)
def db() -> None:
    """Create and migrate the am_ tables (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_app
def db_upgrade(app: App, revision: str) -> None:
    """Migrate the database up to REVISION (default: head)."""
    from anomaly_monitor import migrate

    migrate.upgrade(app.engine, revision)
    click.echo(f"database {redact(app.settings.database_url)} is at revision "
               f"{migrate.current_revision(app.engine)}")


@db.command("downgrade", context_settings={"ignore_unknown_options": True})
@click.argument("revision", default="-1")
@click.option("--yes", is_flag=True, help="Do not ask before dropping every am_ table.")
@pass_app
def db_downgrade(app: App, revision: str, yes: bool) -> None:
    """Migrate the database down to REVISION (default -1: one step; 'base' drops every
    am_ table, stored models and history included, and asks first)."""
    from anomaly_monitor import migrate

    try:
        target = migrate.downgrade_target(app.engine, revision)
    except ValueError as exc:
        raise CliError(f"migration: {exc}", EXIT_USAGE) from None
    if target is None and not yes:
        lost = _stored_rows(app)
        question = (f"db downgrade {revision} drops every am_ table of "
                    f"{redact(app.settings.database_url)}: {lost}")
        if not sys.stdin.isatty():
            raise CliError(f"{question}; give --yes to do it", EXIT_USAGE)
        if not click.confirm(f"{question}. Drop them?", default=False, err=True):
            raise CliError("nothing was dropped")
    migrate.downgrade(app.engine, revision)
    click.echo(f"database is at revision {migrate.current_revision(app.engine) or 'base'}")


def _stored_rows(app: App) -> str:
    """What the am_ tables hold, for the question before dropping them."""
    from anomaly_monitor import tables

    names = {"model versions": tables.model_versions, "flagged rows": tables.anomalies,
             "quarantined rows": tables.quarantine, "batches": tables.batches}
    inspector = sa.inspect(app.engine)
    counts = []
    with app.engine.connect() as connection:
        for label, table in names.items():
            if inspector.has_table(table.name):
                n = connection.execute(sa.select(sa.func.count()).select_from(table)).scalar()
                counts.append(f"{n} {label}")
    return ", ".join(counts) or "no am_ tables"


@db.command("current")
@pass_app
def db_current(app: App) -> None:
    """Show the database's revision and the newest one available."""
    from anomaly_monitor import migrate

    current, head = migrate.current_revision(app.engine), migrate.head_revision()
    state = "up to date" if current == head else "run: anomaly-monitor db upgrade"
    click.echo(f"current: {current or 'base (no am_ tables)'}; head: {head} ({state})")


def _require_schema(app: App) -> None:
    from anomaly_monitor import migrate

    current, head = migrate.current_revision(app.engine), migrate.head_revision()
    if current != head:
        raise CliError(
            f"the am_ tables are at revision {current or 'base'}, not {head}; "
            "run: anomaly-monitor db upgrade"
        )


# -- check ------------------------------------------------------------------------------

@main.command()
@pass_app
def check(app: App) -> None:
    """Check the config, the database and every monitor's table, timestamps, privileges
    and active model; every problem is reported, then the exit status is 2."""
    from anomaly_monitor.checks import check_monitor, check_writes

    settings = app.settings
    click.echo(f"config {settings.path}: ok ({len(settings.monitors)} monitor(s))")
    with app.engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    click.echo(f"database {redact(settings.database_url)}: reachable")
    _require_schema(app)
    click.echo("am_ tables: up to date")
    problems = []
    with app.engine.connect() as connection:
        findings = [check_writes(connection)]
        for monitor in settings.monitors:
            findings += check_monitor(connection, settings, monitor)
    for finding in findings:
        click.echo(finding.message if finding.ok else f"PROBLEM: {finding.message}")
        if not finding.ok:
            problems.append(finding.message)
    if problems:
        raise CliError(f"check found {len(problems)} problem(s):\n  "
                       + "\n  ".join(problems), EXIT_USAGE)


# -- train / calibrate ------------------------------------------------------------------

@main.command()
@click.argument("monitor")
@click.option("--since", type=click.DateTime(DATETIME_FORMATS), help="Oldest row (UTC).")
@click.option("--until", type=click.DateTime(DATETIME_FORMATS), help="Rows before this (UTC).")
@click.option("--limit", type=click.IntRange(min=1), help="Train on the newest N rows.")
@click.option("--epochs", type=click.IntRange(min=1), help="Maximum training epochs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--activate/--no-activate", default=True, show_default=True,
              help="Make the new version active.")
@pass_app
def train(app: App, monitor: str, since: dt.datetime | None, until: dt.datetime | None,
          limit: int | None, epochs: int | None, device: str, activate: bool) -> None:
    """Train a new model version of MONITOR on its table."""
    from anomaly_monitor.lifecycle import train_monitor

    settings = app.settings.monitor(monitor)
    check_model_params(app.settings, settings)
    _require_schema(app)
    report = train_monitor(
        app.engine, settings, since=as_utc(since), until=as_utc(until), limit=limit, epochs=epochs,
        device=device, activate_version=activate, verbose=sys.stderr.isatty(),
    )
    v = report.version
    click.echo(f"monitor {monitor}: version {v.version} ({v.kind}) trained on {report.rows} "
               f"rows, {v.training['holdout_rows']} held out, {report.skipped} skipped, "
               f"in {report.seconds:.1f} s on {v.training['device']}")
    click.echo(f"threshold {v.threshold:.6g} ({v.threshold_method}); held-out flag rate "
               f"{v.validation['holdout_flag_rate']:.4f}")
    if v.validation.get("auroc") is not None:
        click.echo(f"held-out AUROC against {settings.label_column}: "
                   f"{v.validation['auroc']:.3f}")
    click.echo("status: active" if report.activated else
               f"status: candidate (activate with: anomaly-monitor models activate "
               f"{v.version} --monitor {monitor})")


@main.command()
@click.argument("monitor")
@click.option("--method", type=click.Choice(THRESHOLD_METHODS),
              help=f"Default: from config ({DEFAULT_METHOD} unless set there; robust fits the "
                   "bulk of the held-out scores, so anomalies among them do not move it).")
@click.option("--target-fpr", type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--alerts-per-day", type=click.FloatRange(0, min_open=True))
@click.option("--value", type=float, help="The threshold for --method fixed.")
@click.option("--dry-run", is_flag=True, help="Show what each threshold would flag; change "
              "nothing.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a score histogram PNG.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def calibrate(app: App, monitor: str, method: str | None, target_fpr: float | None,
              alerts_per_day: float | None, value: float | None, dry_run: bool,
              plot: str | None, as_json: bool) -> None:
    """Set the threshold of MONITOR's active version from its held-out scores."""
    from anomaly_monitor.lifecycle import apply_calibration, plan_calibration, plot_calibration

    settings = app.settings.monitor(monitor)
    base = settings.threshold
    chosen_method = method or base.method
    if chosen_method == "fixed" and value is None and base.value is None:
        raise CliError("--method fixed needs --value", EXIT_USAGE)
    threshold_settings = ThresholdSettings(
        method=chosen_method,
        target_fpr=target_fpr if target_fpr is not None else base.target_fpr,
        alerts_per_day=alerts_per_day if target_fpr is None else None,
        value=value if value is not None else base.value,
    )
    if alerts_per_day is None and target_fpr is None:
        threshold_settings = ThresholdSettings(chosen_method, threshold_settings.target_fpr,
                                               base.alerts_per_day, threshold_settings.value)
    plan = plan_calibration(app.engine, settings, threshold_settings)
    if plot:
        plot_calibration(plan, plot)
    if as_json:
        _echo_json(_calibration_json(plan, dry_run))
    else:
        _print_calibration(monitor, plan)
    if plot:
        click.echo(f"wrote {plot}", err=as_json)
    for key in ("fallback", "warning"):
        if key in plan.chosen.params:
            click.echo(f"warning: {plan.chosen.params[key]}", err=True)
    if dry_run:
        click.echo("dry run: nothing changed", err=as_json)
        return
    apply_calibration(app.engine, settings, plan)
    click.echo(f"threshold of version {plan.version.version} set to {plan.chosen.value:.6g} "
               f"({plan.chosen.method})", err=as_json)


def _calibration_json(plan: CalibrationPlan, dry_run: bool) -> dict[str, Any]:
    """The ``calibrate --json`` document."""
    return {
        "version": plan.version.version, "chosen": plan.chosen.to_dict(), "dry_run": dry_run,
        "holdout_rows": int(plan.holdout_scores.size),
        "recent_rows": int(plan.recent_scores.size),
        "labelled_rows": plan.labelled_rows, "labelled_anomalies": plan.labelled_anomalies,
        "estimated_contamination": plan.contamination,
        "candidates": [{"label": c.label, "method": c.threshold.method,
                        "threshold": c.threshold.value, "holdout_flag_rate": c.holdout_rate,
                        "recent_flagged": c.recent_flagged, "precision": c.precision,
                        "recall": c.recall, "f1": c.f1}
                       for c in plan.candidates],
    }


def _print_calibration(monitor: str, plan: CalibrationPlan) -> None:
    """The ``calibrate`` table: each candidate's flags, and its precision/recall given labels."""
    labelled = f", {plan.labelled_rows} labelled ({plan.labelled_anomalies} anomalies)" \
        if plan.labelled_rows else ""
    click.echo(f"monitor {monitor}, version {plan.version.version}: "
               f"{plan.holdout_scores.size} held-out rows{labelled}, "
               f"{plan.recent_scores.size} recent rows")
    if plan.contamination is not None:
        click.echo(f"robust fit: {plan.contamination:.2%} of held-out rows score above the "
                   "bulk of normal scores")
    headers = ["threshold", "value", "held-out flagged", "recent flagged"]
    rows: list[list[Any]] = [[c.label, f"{c.threshold.value:.6g}", f"{c.holdout_rate:.4%}",
                              c.recent_flagged] for c in plan.candidates]
    if plan.labelled_rows:
        headers += ["precision", "recall", "F1"]
        for row, c in zip(rows, plan.candidates, strict=True):
            row += ["-" if v is None else f"{v:.3f}" for v in (c.precision, c.recall, c.f1)]
    _table(headers, rows)


# -- models -----------------------------------------------------------------------------

@main.group(cls=Group)
def models() -> None:
    """List, inspect, activate and roll back model versions."""


_monitor_option = click.option("--monitor", "-m", "monitor_name",
                               help="Monitor (needed when several are configured).")


@models.command("list")
@_monitor_option
@click.option("--json", "as_json", is_flag=True)
@pass_app
def models_list(app: App, monitor_name: str | None, as_json: bool) -> None:
    """List the versions of a monitor, newest first."""
    from anomaly_monitor.registry import list_versions

    names = ([app.settings.monitor(monitor_name).name] if monitor_name
             else [m.name for m in app.settings.monitors])
    with app.engine.connect() as connection:
        versions = [v for name in names for v in list_versions(connection, name)]
    if as_json:
        _echo_json([v.to_dict() for v in versions])
        return
    _table(["monitor", "version", "kind", "status", "threshold", "method", "rows", "created"],
           [(v.monitor, v.version, v.kind, v.status, f"{v.threshold:.6g}", v.threshold_method,
             v.training.get("rows"), v.created_at.isoformat(timespec="seconds"))
            for v in versions])


@models.command("show")
@click.argument("version", type=int)
@_monitor_option
@pass_app
def models_show(app: App, version: int, monitor_name: str | None) -> None:
    """Show everything recorded about VERSION (JSON)."""
    from anomaly_monitor.registry import get_version

    monitor = app.monitor(monitor_name)
    with app.engine.connect() as connection:
        _echo_json(get_version(connection, monitor.name, version).to_dict())


def _activation(app: App, monitor_name: str | None,
                action: Callable[[sa.Connection, MonitorSettings], Any]) -> None:
    monitor = app.monitor(monitor_name)
    with app.engine.begin() as connection:
        version = action(connection, monitor)
    click.echo(f"monitor {monitor.name}: version {version.version} is active "
               f"(threshold {version.threshold:.6g}); running workers pick it up at their "
               "next batch")


@models.command("activate")
@click.argument("version", type=int)
@_monitor_option
@pass_app
def models_activate(app: App, version: int, monitor_name: str | None) -> None:
    """Make VERSION the active model (after verifying its artifact)."""
    from anomaly_monitor.lifecycle import activate_checked

    _activation(app, monitor_name,
                lambda connection, m: activate_checked(connection, m, None, version))


@models.command("rollback")
@_monitor_option
@pass_app
def models_rollback(app: App, monitor_name: str | None) -> None:
    """Re-activate the version that was active before the current one."""
    from anomaly_monitor.lifecycle import rollback

    _activation(app, monitor_name, rollback)


# -- run / status / anomalies -------------------------------------------------------------

@main.command()
@click.option("--once", is_flag=True, help="Process everything pending, then exit.")
@click.option("--monitor", "-m", "monitor_names", multiple=True,
              help="Only these monitors (repeatable).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=SCORING_THREADS,
              show_default=True,
              help="CPU threads per scoring operation (batches are small: spare cores "
                   "serve other monitors and the readers).")
@click.option("--reader", type=click.Choice(["auto", "plain"]), default="auto",
              show_default=True,
              help="How windows are read: auto (Arrow for full windows, where the driver "
                   "has it) or plain (SQLAlchemy only, e.g. to rule the Arrow path out).")
@pass_app
def run(app: App, once: bool, monitor_names: tuple[str, ...], device: str,
        threads: int, reader: str) -> None:
    """Score new rows: the daemon, or a single pass with --once."""
    from prometheus_client import CollectorRegistry

    from anomaly_monitor.metrics import Metrics
    from anomaly_monitor.worker import Worker

    settings = app.settings
    if not settings.monitors:
        raise CliError(f"{settings.path}: no [[monitor]] configured", EXIT_USAGE)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    registry = CollectorRegistry()
    worker = Worker(settings, app.engine, Metrics(registry), device=device,
                    monitors=list(monitor_names) or None, threads=threads, reader=reader)
    worker.check_reload = lambda: _check_new_config(app, monitor_names)
    restore_signals = worker.install_signal_handlers()
    try:
        if once:
            _run_once(app, worker)
            return
        if settings.metrics_port:
            _serve_metrics(registry, settings)
        # The daemon waits for a database that is down at start-up instead of exiting.
        if worker.wait_for_database(lambda: _require_schema(app)):
            worker.run_forever(install_signals=False)
    finally:
        restore_signals()
    if worker.reload_requested:
        _restart_process(app)


def _check_new_config(app: App, monitor_names: Sequence[str]) -> None:
    """Read the configuration again (SIGHUP); raises when it is invalid."""
    settings = load_settings(app.config)
    for name in monitor_names:
        settings.monitor(name)
    if not settings.monitors:
        raise ConfigError(f"{settings.path}: no [[monitor]] configured")


def _restart_process(app: App) -> None:
    """Replace this process with a fresh ``run`` of the same command line (after
    SIGHUP): configuration, models and connections are set up again; the pid stays."""
    app.close()
    logging.getLogger(__name__).info("restarting with the configuration read afresh")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # The interpreter's own command line, flags included (``python -m anomaly_monitor``
    # or the console script): the same code starts, whatever the working directory holds.
    os.execv(sys.executable, sys.orig_argv)  # noqa: S606 (our own command line, no shell)


def _run_once(app: App, worker: Any) -> None:
    _require_schema(app)
    states = worker.run_once()
    for name, state in states.items():
        outcome = "done" if state.status == "running" else state.status
        click.echo(f"monitor {name}: {outcome}, {state.batches} batches, {state.rows} rows, "
                   f"{state.flagged} flagged, {state.quarantined} quarantined")
        if state.status == "standby":  # not an error: a live leader does the work
            click.echo(f"monitor {name}: {state.detail}; nothing to do here")
    paused = [n for n, s in states.items() if s.status == "paused"]
    failed = [n for n, s in states.items() if s.status == "error"]
    if failed:
        raise CliError(f"monitor(s) failing: {', '.join(failed)} (reasons logged above)")
    if paused:
        raise CliError(f"monitor(s) paused: {', '.join(paused)} (reasons logged above)",
                       EXIT_USAGE)


def _serve_metrics(registry: Any, settings: Settings) -> None:
    from anomaly_monitor.metrics import serve

    try:
        serve(registry, settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {settings.metrics_host}:"
                       f"{settings.metrics_port}: {exc.strerror or exc}") from None
    logging.getLogger(__name__).info(
        "metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@pass_app
def status(app: App, as_json: bool) -> None:
    """Per monitor: model, threshold, cursor, backlog, lag, last batch, anomalies (24 h)."""
    from anomaly_monitor.report import monitor_status

    _require_schema(app)
    with app.engine.connect() as connection:
        states = [monitor_status(connection, m) for m in app.settings.monitors]
    if as_json:
        _echo_json({"database": redact(app.settings.database_url), "monitors": states})
        return
    _table(["monitor", "state", "version", "threshold", "cursor", "backlog", "lag s",
            "last batch", "anomalies 24h"],
           [(s["monitor"], s["state"], s["active_version"],
             f"{s['threshold']:.6g}" if s["threshold"] is not None else None, s["cursor"],
             s["backlog"], s["lag_seconds"],
             s["last_batch"]["started_at"] if s["last_batch"] else None, s["anomalies_24h"])
            for s in states])
    for s in states:
        lease = s["lease"]
        if lease is not None:
            verb = "held until" if not lease["expired"] else "expired at"
            click.echo(f"monitor {s['monitor']}: lease {verb} {lease['expires_at']} (database "
                       f"clock) by {lease['owner']}")
        if s["pause_reason"]:
            click.echo(f"paused by the worker (cleared when it next finds the problem fixed): "
                       f"{s['pause_reason']}")
        if s["source_error"] and s["source_error"] != s["pause_reason"]:
            click.echo(f"source check now: {s['source_error']}")


@main.command()
@click.argument("monitor")
@click.option("--since", type=click.DateTime(DATETIME_FORMATS),
              help="Only rows scored since (UTC).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def anomalies(app: App, monitor: str, since: dt.datetime | None, limit: int,
              as_json: bool) -> None:
    """Flagged rows of MONITOR with severity and top features."""
    from anomaly_monitor.report import list_anomalies

    app.settings.monitor(monitor)
    with app.engine.connect() as connection:
        rows = list_anomalies(connection, monitor, since=as_utc(since), limit=limit)
    if as_json:
        _echo_json(rows)
        return
    _table(["source id", "timestamp", "score", "severity", "version", "top features"],
           [(r["source_id"], r["source_timestamp"], f"{r['score']:.4g}", r["severity"],
             r["model_version"],
             ", ".join(f"{c['feature']} ({c['share']:.0%})" for c in r["top_features"]))
            for r in rows])


@main.command("cursor")
@click.argument("monitor")
@click.option("--reset-to", "reset_to", type=int, metavar="ID",
              help="Score the rows with ids above ID next.")
@click.option("--to-start", is_flag=True, help="Score every row of the table, lowest id first.")
@click.option("--to-end", is_flag=True, help="Skip the backlog: score only rows added later.")
@click.option("--force", is_flag=True,
              help="Move it even while a live worker holds the lease (its batch rolls back).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def cursor(app: App, monitor: str, reset_to: int | None, to_start: bool, to_end: bool,
           force: bool, as_json: bool) -> None:
    """Show MONITOR's cursor, or move it (after the table's ids restarted, to rescore
    rows or to skip a backlog). Moving it back starts a new generation: rows scored
    from there are recorded beside the older records of the same ids."""
    from anomaly_monitor.cursors import LeaseHeldError
    from anomaly_monitor.report import cursor_report, move_cursor

    chosen = [name for name, on in (("--reset-to", reset_to is not None),
                                    ("--to-start", to_start), ("--to-end", to_end)) if on]
    if len(chosen) > 1:
        raise CliError(f"{' and '.join(chosen)} conflict: give one", EXIT_USAGE)
    if force and not chosen:
        raise CliError("--force needs --reset-to, --to-start or --to-end", EXIT_USAGE)
    settings = app.settings.monitor(monitor)
    _require_schema(app)
    target = "start" if to_start else "end" if to_end else reset_to
    if target is not None:
        try:
            with app.engine.begin() as connection:
                moved = move_cursor(connection, settings, target, force=force)
        except LeaseHeldError as exc:
            raise CliError(str(exc)) from None
        except LookupError as exc:
            raise CliError(str(exc)) from None
    with app.engine.connect() as connection:
        report = cursor_report(connection, settings)
    if target is not None:
        report["moved"] = moved
    if as_json:
        _echo_json(report)
        return
    if target is not None:
        click.echo(moved["summary"])
    click.echo(f"monitor {monitor}: cursor {report['position']} (generation "
               f"{report['generation']}); table {report['table']}: newest id "
               f"{report['newest_id']}, {report['backlog']} row(s) after the cursor")
    if report["paused"]:
        click.echo(f"paused: {report['pause_reason']}")
    lease = report["lease"]
    if lease is not None and not lease["expired"]:
        click.echo(f"lease held until {lease['expires_at']} (database clock) by "
                   f"{lease['owner']}")


@main.command()
@click.option("--directory", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default=True, help="Where the demo writes its database and config.")
@click.option("--seconds", type=click.IntRange(min=5), default=60, show_default=True,
              help="How long the daemon runs while rows arrive.")
@click.option("--port", type=click.IntRange(0, 65535), default=9108, show_default=True,
              help="Metrics port (0: off).")
def demo(directory: Path, seconds: int, port: int) -> None:
    """Simulate plant telemetry on SQLite, train, calibrate and run the daemon."""
    from anomaly_monitor.demo import run_demo

    run_demo(directory, seconds=seconds, metrics_port=port, echo=click.echo)
