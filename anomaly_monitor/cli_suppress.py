"""``suppress add|list|remove``: one-off windows whose flags raise no incident or alert."""

from __future__ import annotations

import datetime as dt

import click

from anomaly_monitor.cli import (
    DATETIME,
    EXIT_USAGE,
    App,
    CliError,
    Group,
    echo_json,
    main,
    pass_app,
    print_table,
    require_schema,
)
from anomaly_monitor.cli_feedback import author_of
from anomaly_monitor.tables import ENTITY_LENGTH


@main.group(cls=Group)
def suppress() -> None:
    """Suppression windows: flags of rows stamped inside one are stored and marked, but
    raise no incident and no alert (recurring windows: [[monitor.suppress]] in the
    config)."""


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC)


@suppress.command("add")
@click.argument("monitor")
@click.option("--start", type=DATETIME, required=True,
              help="When the window opens (ISO 8601; UTC unless it has an offset).")
@click.option("--end", type=DATETIME, required=True, help="When it closes (exclusive).")
@click.option("--entity", help="Only this entity of a window monitor (default: all).")
@click.option("--reason", default="", help="Why (shown by suppress list).")
@click.option("--skip-training", is_flag=True,
              help="Also leave the window's rows out of training.")
@click.option("--by", "author", help="Who (default: the login name).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def suppress_add(app: App, monitor: str, start: dt.datetime, end: dt.datetime,
                 entity: str | None, reason: str, skip_training: bool, author: str | None,
                 as_json: bool) -> None:
    """Suppress MONITOR's flags of rows stamped from --start to --end."""
    from anomaly_monitor.entities import entity_key
    from anomaly_monitor.suppression import SuppressionError, add_window

    settings = app.settings.monitor(monitor)
    if entity is not None and settings.entity_column is None:
        raise CliError(f"--entity: monitor {monitor!r} has no entity_column", EXIT_USAGE)
    if entity is not None and len(entity) > ENTITY_LENGTH:
        raise CliError(f"--entity has {len(entity)} characters; at most {ENTITY_LENGTH}",
                       EXIT_USAGE)
    require_schema(app)
    who = author_of(author)
    try:
        with app.engine.begin() as connection:
            number = add_window(connection, monitor, _aware(start), _aware(end),
                                entity=None if entity is None else entity_key(entity),
                                reason=reason, skip_training=skip_training, author=who)
    except SuppressionError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if as_json:
        echo_json({"id": number, "monitor": monitor})
        return
    whom = "all entities" if entity is None else f"entity {entity!r}"
    click.echo(f"monitor {monitor}: suppression window {number} from "
               f"{_aware(start).isoformat()} to {_aware(end).isoformat()} ({whom})"
               + ("; its rows are left out of training" if skip_training else ""))


@suppress.command("list")
@click.argument("monitor")
@click.option("--removed", is_flag=True, help="Also the windows removed.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def suppress_list(app: App, monitor: str, removed: bool, as_json: bool) -> None:
    """MONITOR's one-off windows, and the recurring ones of the config."""
    from anomaly_monitor.suppression import list_windows

    settings = app.settings.monitor(monitor)
    require_schema(app)
    with app.engine.connect() as connection:
        rows = list_windows(connection, monitor, removed=removed)
    recurring = [{"name": w.name, "cron": w.cron, "duration_seconds": w.duration_seconds,
                  "timezone": w.timezone, "entity": w.entity, "reason": w.reason,
                  "skip_training": w.skip_training} for w in settings.suppress]
    if as_json:
        echo_json({"monitor": monitor, "windows": rows, "recurring": recurring})
        return
    if not rows and not recurring:
        click.echo(f"no suppression windows for monitor {monitor!r}")
        return
    if rows:
        print_table(["id", "start", "end", "entity", "skip training", "reason", "by",
                     *(["removed"] if removed else [])],
                    [(r["id"], r["start"], r["end"], r["entity"] or "(all)",
                      "yes" if r["skip_training"] else "no", r["reason"], r["author"],
                      *([r["removed_at"] or "-"] if removed else [])) for r in rows])
    if recurring:
        click.echo("recurring (config):")
        print_table(["name", "cron", "time zone", "duration s", "entity", "skip training",
                     "reason"],
                    [(w["name"], w["cron"], w["timezone"], f"{w['duration_seconds']:g}",
                      w["entity"] or "(all)", "yes" if w["skip_training"] else "no",
                      w["reason"]) for w in recurring])


@suppress.command("remove")
@click.argument("window_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--monitor", "monitor_name", help="The monitor (needed when there are several).")
@pass_app
def suppress_remove(app: App, window_id: int, monitor_name: str | None) -> None:
    """Remove one-off window ID: rows scored from now on are no longer suppressed by it
    (flags it marked stay marked)."""
    from anomaly_monitor.suppression import SuppressionError, remove_window

    settings = app.monitor(monitor_name)
    require_schema(app)
    try:
        with app.engine.begin() as connection:
            remove_window(connection, settings.name, window_id)
    except SuppressionError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    click.echo(f"monitor {settings.name}: removed suppression window {window_id}")
