"""``label`` and ``feedback``: operators mark flags and incidents true or false positives."""

from __future__ import annotations

import getpass

import click

from anomaly_monitor.cli import (
    EXIT_USAGE,
    App,
    CliError,
    echo_json,
    main,
    pass_app,
    print_table,
    ratio,
    require_schema,
)
from anomaly_monitor.feedback import NOTE_MAX_CHARS
from anomaly_monitor.tables import AUTHOR_LENGTH


def login() -> str:
    """Who labels, by default: the login name (``unknown`` without one)."""
    try:
        return getpass.getuser()[:AUTHOR_LENGTH]
    except (KeyError, OSError):
        return "unknown"


def author_of(by: str | None) -> str:
    """Who acts: ``--by`` or else the login name; a usage error when it is too long."""
    who = (by or "").strip() or login()
    if len(who) > AUTHOR_LENGTH:
        raise CliError(f"--by has {len(who)} characters; at most {AUTHOR_LENGTH}", EXIT_USAGE)
    return who


@main.command("label")
@click.argument("monitor")
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=0))
@click.option("--tp", is_flag=True, help="True positives: real anomalies.")
@click.option("--fp", is_flag=True,
              help="False positives: not anomalies (an fp incident raises no alert).")
@click.option("--incident", is_flag=True,
              help="IDS are incident ids (anomaly-monitor incidents): label each incident "
                   "and all its flags.")
@click.option("--note", help=f"Why (kept with the label, up to {NOTE_MAX_CHARS} characters).")
@click.option("--by", "author", help="Who labels (default: the login name).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def label_command(app: App, monitor: str, ids: tuple[int, ...], tp: bool, fp: bool,
                  incident: bool, note: str | None, author: str | None, as_json: bool) -> None:
    """Label flagged rows of MONITOR (their source ids, as anomaly-monitor anomalies
    shows them) or, with --incident, whole incidents, as true (--tp) or false (--fp)
    positives. A later label supersedes an earlier one; every label is kept."""
    from anomaly_monitor.feedback import FeedbackError, label

    app.settings.monitor(monitor)
    if tp == fp:
        raise CliError("give one of --tp (real anomalies) or --fp (false alarms)"
                       + (", not both" if tp else ""), EXIT_USAGE)
    verdict = "tp" if tp else "fp"
    if note is not None and len(note) > NOTE_MAX_CHARS:
        raise CliError(f"--note has {len(note)} characters; at most {NOTE_MAX_CHARS}",
                       EXIT_USAGE)
    who = author_of(author)
    require_schema(app)
    try:
        with app.engine.begin() as connection:
            done = label(connection, monitor, ids, verdict, incident=incident, note=note,
                         author=who)
    except FeedbackError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if as_json:
        echo_json({"monitor": monitor, "label": verdict, "feedback_ids": done.feedback_ids,
                   "flags": done.flags, "incidents": done.incidents, "author": who})
        return
    what = (f"{len(done.incidents)} incident(s) ({done.flags} flag(s))" if incident
            else f"{done.flags} flag(s)")
    click.echo(f"monitor {monitor}: labelled {what} {verdict} by {who}")


@main.command("feedback")
@click.argument("monitor")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def feedback_command(app: App, monitor: str, limit: int, as_json: bool) -> None:
    """The labels given on MONITOR, newest first (superseded ones too), with the
    precision of its newest labelled flags."""
    from anomaly_monitor.feedback import (
        PRECISION_WINDOW_FLAGS,
        alert_levels,
        best_alert_level,
        feedback_counts,
        history,
        recent_precision,
    )

    settings = app.settings.monitor(monitor)
    require_schema(app)
    with app.engine.connect() as connection:
        rows = history(connection, monitor, limit=limit)
        counts = feedback_counts(connection, monitor)
        precision, measured = recent_precision(connection, monitor)
        levels = alert_levels(connection, monitor)
    best = best_alert_level(levels)
    if as_json:
        echo_json({"monitor": monitor, "counts": counts, "precision": precision,
                   "precision_flags": measured, "alert_levels": levels,
                   "best_alert_severity": best,
                   "alert_severity": settings.incidents.alert_severity, "labels": rows})
        return
    if not rows:
        click.echo(f"no labels on monitor {monitor!r} yet; give some with: anomaly-monitor "
                   f"label {monitor} SOURCE_ID... --tp|--fp")
        return
    click.echo(f"monitor {monitor}: {counts['tp']} tp, {counts['fp']} fp labels given"
               + ("" if precision is None else
                  f"; precision {precision:.2f} over the newest {measured} labelled flags "
                  f"(of at most {PRECISION_WINDOW_FLAGS})"))
    print_table(["id", "target", "target id", "source id", "label", "by", "at", "note"],
                [(r["id"], r["target"], r["target_id"], r["source_id"] or "-", r["label"],
                  r["author"], r["created_at"], r["note"] or "") for r in rows])
    if levels:
        click.echo("\nalert_severity against the labelled incidents ([monitor.incidents] "
                   f"alert_severity is {settings.incidents.alert_severity:g}"
                   + (f"; the best F1 at {best:g}" if best is not None else "") + "):")
        print_table(["alert_severity", "alerts", "true", "false", "precision", "recall"],
                    [(f"{r['alert_severity']:g}", r["alerts"], r["true"], r["false"],
                      ratio(r["precision"]), ratio(r["recall"])) for r in levels])

