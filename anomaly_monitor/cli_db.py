"""``db``, ``check``, ``cursor`` and ``backfill``: the database, what the monitors need,
the cursor, and rows written below it."""

from __future__ import annotations

import sys

import click
import sqlalchemy as sa

from anomaly_monitor.cli import (
    EXIT_USAGE,
    App,
    CliError,
    Group,
    echo_json,
    main,
    pass_app,
    require_schema,
)
from anomaly_monitor.db import redact

# -- db ---------------------------------------------------------------------------------

@main.group(cls=Group)
def db() -> None:
    """Create and migrate the am_ tables (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_app
def db_upgrade(app: App, revision: str) -> None:
    """Migrate the database up to REVISION (default: head); creates a missing SQLite file."""
    from anomaly_monitor import migrate

    app.creates_database = True
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


# -- check ------------------------------------------------------------------------------

@main.command()
@pass_app
def check(app: App) -> None:
    """Check the config, the database and every monitor's table, timestamps, privileges
    and active model; every problem is reported, then the exit status is 2."""
    from anomaly_monitor.checks import check_config, check_monitor, check_writes

    settings = app.settings
    problems = []
    for finding in check_config(settings):
        click.echo(finding.message if finding.ok else f"PROBLEM: {finding.message}")
        if not finding.ok:
            problems.append(finding.message)
    with app.engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    click.echo(f"database {redact(settings.database_url)}: reachable")
    require_schema(app)
    click.echo("am_ tables: up to date")
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
    require_schema(app)
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
        echo_json(report)
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


#: The ids a BIGINT column holds.
BIGINT = click.IntRange(-(2**63), 2**63 - 1)


@main.command("backfill")
@click.argument("monitor")
@click.option("--from-id", "from_id", type=BIGINT, required=True, metavar="A",
              help="The lowest id to score.")
@click.option("--to-id", "to_id", type=BIGINT, required=True, metavar="B",
              help="The highest id to score (at most the cursor: the worker scores the rest).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def backfill_command(app: App, monitor: str, from_id: int, to_id: int,
                     as_json: bool) -> None:
    """Score the rows of MONITOR with ids A..B at or below its cursor that no batch
    read (rows written below the cursor, e.g. with old or negative ids), once: ids
    already read are skipped, however often this runs."""
    from anomaly_monitor.below import BackfillError, backfill
    from anomaly_monitor.checks import check_writes
    from anomaly_monitor.cursors import BatchConflictError
    from anomaly_monitor.registry import ModelCache
    from anomaly_monitor.source import SchemaError, reflect_source

    if from_id > to_id:
        raise CliError(f"--from-id {from_id} is above --to-id {to_id}", EXIT_USAGE)
    settings = app.settings.monitor(monitor)
    require_schema(app)
    try:
        with app.engine.connect() as connection:
            writable = check_writes(connection)
            if not writable.ok:
                raise CliError(f"cannot backfill: {writable.message}", EXIT_USAGE)
            source = reflect_source(connection, settings)
        done = backfill(app.engine, settings, source, ModelCache("auto"), from_id, to_id)
    except (BackfillError, SchemaError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except BatchConflictError as exc:  # paused or reset meanwhile: chunks before it stand
        raise CliError(f"{exc}; the batches committed before it stand, and running the "
                       "same backfill again skips them") from None
    batches = done.batches
    totals = {"monitor": monitor, "from_id": done.from_id, "to_id": done.to_id,
              "asked_to_id": to_id, "batches": len(batches), "rows": done.rows,
              "scored": sum(r.scored for r in batches),
              "flagged": sum(r.flagged for r in batches),
              "quarantined": sum(r.quarantined for r in batches), "skipped": done.skipped}
    if as_json:
        echo_json(totals)
        return
    click.echo(f"monitor {monitor}: ids {done.from_id}..{done.to_id}: {totals['scored']} "
               f"row(s) scored, {totals['flagged']} flagged, {totals['quarantined']} "
               f"quarantined in {totals['batches']} batch(es)"
               + (f"; {done.skipped} row(s) skipped (read by a batch already, or in gaps "
                  "the worker's sweep still watches)" if done.skipped else ""))
    if done.to_id < to_id:
        click.echo(f"ids {done.to_id + 1}..{to_id} are above the cursor: the worker scores "
                   "those")
