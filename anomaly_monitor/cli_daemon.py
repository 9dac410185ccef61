"""``run``, ``status``, ``anomalies``, ``incidents`` and ``quarantine``: the daemon and
what it found."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
import sqlalchemy as sa

from anomaly_monitor.cli import (
    DATETIME,
    EXIT_USAGE,
    App,
    CliError,
    check_device,
    echo_json,
    main,
    pass_app,
    print_table,
    require_schema,
)
from anomaly_monitor.config import (
    SCORING_THREADS,
    ConfigError,
    MonitorSettings,
    Settings,
    load_settings,
)
from anomaly_monitor.db import describe_error, redact
from anomaly_monitor.reading.values import REASONS
from anomaly_monitor.runner import is_configuration_error
from anomaly_monitor.source import RESTARTED
from anomaly_monitor.tables import LABEL_FILTERS, as_utc

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
    check_device(device)  # not a pause that outlives the process: refused up front
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    registry = CollectorRegistry()
    worker = Worker(settings, app.engine, Metrics(registry), device=device,
                    monitors=list(monitor_names) or None, threads=threads, reader=reader)
    worker.check_reload = lambda: _check_new_config(app, monitor_names)
    restore_signals = worker.install_signal_handlers()
    # A reload blocks these before it re-execs (the mask survives exec): a SIGTERM sent
    # meanwhile waits until now, and reaches the handlers just installed.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        if once:
            _run_once(app, worker)
            return
        if settings.metrics_port:
            _serve_metrics(registry, settings)
        # The daemon waits for a database that is down at start-up instead of exiting;
        # a rejected login or a missing database is a configuration error (exit 2).
        try:
            ready = worker.wait_for_database(lambda: _require_ready(app))
        except sa.exc.SQLAlchemyError as exc:
            if not is_configuration_error(exc):
                raise
            raise CliError(f"database {redact(settings.database_url)}: "
                           f"{describe_error(exc, settings.database_url)}", EXIT_USAGE) from None
        if ready:
            worker.run_forever(install_signals=False)
    finally:
        if worker.reload_requested:
            # Held back in this thread until the new run installs its handlers; one that
            # another thread (torch's, a reader's) takes meanwhile reaches the handlers
            # still installed here, which cancel the reload (never the default action,
            # which would kill the process mid-reload).
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        else:
            restore_signals()
    if worker.reload_requested:
        _restart_process(app, lambda: worker.reload_requested)
        # Only back here when a stop cancelled the restart: take what is pending, end.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        restore_signals()


#: Held back while a reload re-execs the process (see ``run``).
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _check_new_config(app: App, monitor_names: Sequence[str]) -> None:
    """Read the configuration again (SIGHUP); raises when it is invalid."""
    settings = load_settings(app.config)
    for name in monitor_names:
        settings.monitor(name)
    if not settings.monitors:
        raise ConfigError(f"{settings.path}: no [[monitor]] configured")


def _restart_process(app: App, still_wanted: Callable[[], bool]) -> None:
    """Replace this process with a fresh ``run`` of the same command line (after
    SIGHUP): configuration, models and connections are set up again; the pid stays.
    A stop that came meanwhile (``still_wanted()`` turned false) ends the process
    instead."""
    app.close()
    if not still_wanted():
        logging.getLogger(__name__).info("a stop came during the reload: not restarting")
        return
    logging.getLogger(__name__).info("restarting with the configuration read afresh")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # The interpreter's own command line, flags included (``python -m anomaly_monitor``
    # or the console script): the same code starts, whatever the working directory holds.
    os.execv(sys.executable, sys.orig_argv)  # noqa: S606 (our own command line, no shell)


def _require_ready(app: App) -> None:
    """Refuse to run unless the am_ tables are current and this user may write them (a
    worker that cannot record a batch or a pause would look healthy, and do nothing)."""
    from anomaly_monitor.checks import check_writes

    require_schema(app)
    with app.engine.connect() as connection:
        finding = check_writes(connection)
    if not finding.ok:
        raise CliError(f"cannot run: {finding.message}", EXIT_USAGE)


def _run_once(app: App, worker: Any) -> None:
    _require_ready(app)
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

    require_schema(app)
    with app.engine.connect() as connection:
        states = [monitor_status(connection, m) for m in app.settings.monitors]
    if as_json:
        echo_json({"database": redact(app.settings.database_url), "monitors": states})
        return
    print_table(["monitor", "state", "version", "threshold", "cursor", "backlog",
            "newest row age s", "polled s ago", "last batch", "anomalies 24h",
            "open incidents", "quarantined", "entities"],
           [(s["monitor"], s["state"], s["active_version"],
             f"{s['threshold']:.6g}" if s["threshold"] is not None else None, s["cursor"],
             s["backlog"], s["lag_seconds"], s["seconds_since_poll"],
             s["last_batch"]["started_at"] if s["last_batch"] else None, s["anomalies_24h"],
             s["incidents_open"], sum(s["quarantined"].values()), s["entities"])
            for s in states])
    for s in states:
        lease = s["lease"]
        if lease is not None:
            verb = "held until" if not lease["expired"] else "expired at"
            click.echo(f"monitor {s['monitor']}: lease {verb} {lease['expires_at']} (database "
                       f"clock) by {lease['owner']}")
        if s["standbys"]:
            click.echo(f"monitor {s['monitor']}: standing by: " + ", ".join(
                f"{w['owner']} (seen {w['seconds_ago']:.0f} s ago)" for w in s["standbys"]))
        if s["drift"] is not None and s["drift"]["drifted_features"]:
            drifted = s["drift"]["drifted_features"]
            click.echo(f"monitor {s['monitor']}: drifted from its training data: "
                       f"{len(drifted)} feature(s) ({', '.join(drifted)}), largest PSI "
                       f"{s['drift']['drift_score']:.2f} (anomaly-monitor drift "
                       f"{s['monitor']})")
        if s["challenger"] is not None:
            c = s["challenger"]
            click.echo(f"monitor {s['monitor']}: challenger version {c['version']} in shadow "
                       f"({c['shadow_rows']} rows; gates passed: "
                       f"{', '.join(c['gates_passed']) or 'none'}"
                       + (f"; failing: {', '.join(c['gates_failed'])}" if c["gates_failed"]
                          else "") + f"; promote = {c['promote']})")
        for span in s["suppressed_now"]:
            whom = "" if span["entity"] is None else f" (entity {span['entity']!r})"
            click.echo(f"monitor {s['monitor']}: suppressed by {span['window']}{whom} until "
                       f"{span['until']}")
        if s["pause_reason"]:
            cleared = ("until the cursor is moved" if s["pause_reason"].startswith(RESTARTED)
                       else "cleared when it next finds the problem fixed")
            click.echo(f"paused by the worker ({cleared}): "
                       f"{s['pause_reason']}")
        if s["source_error"] and s["source_error"] != s["pause_reason"]:
            click.echo(f"source check now: {s['source_error']}")
        if s["rows_below_cursor"]:
            click.echo(f"monitor {s['monitor']}: at least {s['rows_below_cursor']} row(s) were "
                       f"written below the cursor and are not scored (counted "
                       f"{s['rows_below_checked_at']}); score them with: anomaly-monitor "
                       f"backfill {s['monitor']} --from-id A --to-id B")


@main.command()
@click.argument("monitor")
@click.option("--since", type=DATETIME,
              help="Only rows stamped since (UTC, the row's own timestamp).")
@click.option("--scored-since", type=DATETIME,
              help="Only rows scored since (UTC).")
@click.option("--entity", help="Only rows of this entity (a window monitor's "
                               "entity_column value).")
@click.option("--label", type=click.Choice(LABEL_FILTERS),
              help="Only rows labelled so (anomaly-monitor label); none: unlabelled ones.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def anomalies(app: App, monitor: str, since: dt.datetime | None,
              scored_since: dt.datetime | None, entity: str | None, label: str | None,
              limit: int, as_json: bool) -> None:
    """Flagged rows of MONITOR with score, threshold, severity and top features."""
    from anomaly_monitor.report import list_anomalies

    settings = _with_entity(app, monitor, entity)
    require_schema(app)
    with app.engine.connect() as connection:
        rows = list_anomalies(connection, monitor, since=as_utc(since),
                              scored_since=as_utc(scored_since), entity=entity, label=label,
                              limit=limit)
    if as_json:
        echo_json(rows)
        return
    with_entity = settings.entity_column is not None
    # The incident column names the suppression window of a suppressed flag.
    print_table(["source id", *(["entity"] if with_entity else []), "timestamp", "score",
                 "threshold", "severity", "version", "incident", "label", "top features"],
           [(r["source_id"], *([r["entity"]] if with_entity else []), r["source_timestamp"],
             f"{r['score']:.4g}", f"{r['threshold']:.4g}", r["severity"], r["model_version"],
             r["incident_id"] if r["incident_id"] is not None else
             (f"suppressed ({r['suppressed_by']})" if r["suppressed_by"] else "-"),
             r["label"] or "-", _shares(r["top_features"]))
            for r in rows])


@main.command()
@click.argument("monitor")
@click.option("--open", "only_open", is_flag=True, help="Only open incidents.")
@click.option("--since", type=DATETIME,
              help="Only incidents with a flag stamped since (UTC, the rows' own timestamps).")
@click.option("--entity", help="Only incidents of this entity (a window monitor's "
                               "entity_column value).")
@click.option("--label", type=click.Choice(LABEL_FILTERS),
              help="Only incidents labelled so (anomaly-monitor label --incident); none: "
                   "unlabelled ones.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def incidents(app: App, monitor: str, only_open: bool, since: dt.datetime | None,
              entity: str | None, label: str | None, limit: int, as_json: bool) -> None:
    """Incidents of MONITOR: flags of one entity that follow each other within the
    monitor's gap, with their span, rows, severity and top features."""
    from anomaly_monitor.report import list_incidents

    settings = _with_entity(app, monitor, entity)
    require_schema(app)
    with app.engine.connect() as connection:
        rows = list_incidents(connection, monitor, only_open=only_open, since=as_utc(since),
                              entity=entity, label=label, limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no {'open ' if only_open else ''}incidents of monitor {monitor!r}"
                   + (" matching the filters" if since or entity or label else ""))
        return
    with_entity = settings.entity_column is not None
    print_table(["id", *(["entity"] if with_entity else []), "state", "first flag",
                 "last flag", "rows", "severity", "label", "top features"],
                [(r["id"], *([r["entity"]] if with_entity else []), r["state"],
                  r["first_timestamp"], r["last_timestamp"], r["rows"], r["max_severity"],
                  r["label"] or "-",
                  _shares(r["top_features"]))
                 for r in rows])
    if len(rows) == limit:
        click.echo(f"(the newest {limit}; --limit N for more)")


@main.command("quarantine")
@click.argument("monitor")
@click.option("--reason", type=click.Choice(REASONS), help="Only rows of this reason.")
@click.option("--since", type=DATETIME,
              help="Only rows quarantined since (UTC).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def quarantine_command(app: App, monitor: str, reason: str | None, since: dt.datetime | None,
                       limit: int, as_json: bool) -> None:
    """Rows of MONITOR that could not be scored, with the reason and their raw values."""
    from anomaly_monitor.report import list_quarantine

    app.settings.monitor(monitor)
    require_schema(app)
    with app.engine.connect() as connection:
        rows = list_quarantine(connection, monitor, reason=reason, since=as_utc(since),
                               limit=limit)
    if as_json:
        echo_json(rows)
        return
    print_table(["source id", "reason", "detail", "quarantined at", "raw values"],
                [(r["source_id"], r["reason"], r["detail"], r["quarantined_at"],
                  _short(r["raw_values"])) for r in rows])


def _with_entity(app: App, monitor: str, entity: str | None) -> MonitorSettings:
    """The monitor's settings; a usage error for ``--entity`` on a monitor without one."""
    settings = app.settings.monitor(monitor)
    if entity is not None and settings.entity_column is None:
        raise click.UsageError(f"--entity: monitor {monitor!r} has no entity_column")
    return settings


def _shares(top: list[dict[str, Any]]) -> str:
    """Top features as ``name (share%), ...``."""
    return ", ".join(f"{c['feature']} ({c['share']:.0%})" for c in top)


def _short(values: Any, width: int = 60) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in (values or {}).items())
    return text if len(text) <= width else text[:width - 3] + "..."
