"""``backtest``: what a version would flag over stored history, before it goes live."""

from __future__ import annotations

import datetime as dt
import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import click

from anomaly_monitor.cli import (
    DATETIME,
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
from anomaly_monitor.cli_models import check_plot_path

if TYPE_CHECKING:
    from anomaly_monitor.backtest import Backtest, ThresholdRun

#: ``--json`` lists at most this many flags (of the first threshold).
MAX_JSON_FLAGS = 10_000


@main.command()
@click.argument("monitor")
@click.option("--since", type=DATETIME, required=True,
              help="Rows stamped at or after this (UTC unless it has an offset).")
@click.option("--until", type=DATETIME, help="Rows stamped before this (default: now).")
@click.option("--version", "version", type=click.IntRange(min=1),
              help="Replay this version (e.g. a candidate from train --no-activate); "
                   "default: the active one.")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="Report this threshold (repeat to compare several); default: the "
                   "version's.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write scores over time, the thresholds and the flags as a PNG.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def backtest(app: App, monitor: str, since: dt.datetime, until: dt.datetime | None,
             version: int | None, thresholds: tuple[float, ...], plot: str | None,
             as_json: bool) -> None:
    """Replay MONITOR's rows stamped from --since to --until through a stored version,
    exactly as run scores them, and report flags and incidents per day, the flag rate
    against the calibrated one, severities and precision/recall (from a label column or
    feedback). Writes nothing: flags, incidents and the cursor stay as they are."""
    from anomaly_monitor.backtest import rows_to_read, run_backtest
    from anomaly_monitor.backtest_plot import plot_backtest

    settings = app.settings.monitor(monitor)
    start = since.replace(tzinfo=dt.UTC)
    end = until.replace(tzinfo=dt.UTC) if until is not None else dt.datetime.now(dt.UTC)
    if end <= start:
        raise CliError(f"--until ({end.isoformat()}) must be after --since "
                       f"({start.isoformat()})", EXIT_USAGE)
    if any(t != t or t in (float("inf"), float("-inf")) for t in thresholds):
        raise CliError("--threshold must be a finite number", EXIT_USAGE)
    if plot:
        check_plot_path(plot)
    require_schema(app)
    show = sys.stderr.isatty() and not as_json
    total = rows_to_read(app.engine, settings, since=start, until=end, version=version) \
        if show else 0
    bar = click.progressbar(length=total, label="replaying", file=sys.stderr) \
        if show else nullcontext()
    with bar as progress:
        report = run_backtest(app.engine, settings, since=start, until=end, version=version,
                              thresholds=thresholds,
                              progress=progress.update if progress is not None else None)
    if plot:
        plot_backtest(report, plot)
    if as_json:
        echo_json(_document(report))
    else:
        _print(report)
    if plot:
        click.echo(f"wrote {plot}", err=as_json)


def _run_summary(report: Backtest, run: ThresholdRun) -> dict[str, Any]:
    from anomaly_monitor.backtest import flag_rate

    return {"threshold": run.threshold, "label": run.label, "flags": len(run.flags),
            "suppressed": run.suppressed, "flag_rate": flag_rate(report, run),
            "incidents": run.incidents, "alerts": run.alerts,
            "precision": run.precision, "recall": run.recall,
            "per_day": {day: dict(counts) for day, counts in sorted(run.per_day.items())},
            "severity": run.severity_bands()}


def _document(report: Backtest) -> dict[str, Any]:
    """The ``backtest --json`` document."""
    main_run = report.runs[0]
    return {
        "monitor": report.monitor, "version": report.version,
        "version_status": report.status, "since": report.since.isoformat(),
        "until": report.until.isoformat(), "rows": report.rows,
        "quarantined": report.quarantined, "calibrated_flag_rate": report.calibrated_rate,
        "labels_from": report.labels_from,
        "thresholds": [_run_summary(report, run) for run in report.runs],
        "flags": [{"source_id": f["source_id"], "entity": f["entity"],
                   "source_timestamp": f["source_timestamp"].isoformat()
                   if f["source_timestamp"] else None, "score": f["score"],
                   "severity": round(f["severity"], 1), "suppressed_by": f["suppressed_by"]}
                  for f in main_run.flags[:MAX_JSON_FLAGS]],
        "flags_truncated": len(main_run.flags) > MAX_JSON_FLAGS,
        "written": False,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _print(report: Backtest) -> None:
    """The human backtest report."""
    click.echo(f"monitor {report.monitor}, version {report.version} ({report.status}): rows "
               f"stamped {report.since:%Y-%m-%d %H:%M:%S} to {report.until:%Y-%m-%d %H:%M:%S} "
               f"UTC: {report.rows} scored, {report.quarantined} quarantined")
    if report.rows == 0:
        click.echo("no rows in the range (a window monitor replays only rows after its "
                   "version's training window)")
    labelled = report.labels_from is not None
    headers = ["threshold", "flags", "suppressed", "flag rate", "calibrated rate",
               "incidents", "alerts", *(["precision", "recall"] if labelled else [])]
    rows = []
    for run in report.runs:
        summary = _run_summary(report, run)
        rows.append([f"{run.threshold:.6g} ({run.label})", summary["flags"],
                     summary["suppressed"], _percent(summary["flag_rate"]),
                     _percent(report.calibrated_rate), summary["incidents"], run.alerts,
                     *([ratio(run.precision), ratio(run.recall)] if labelled else [])])
    print_table(headers, rows)
    if labelled:
        click.echo(f"precision and recall from the {report.labels_from}")
    first = report.runs[0]
    click.echo(f"\nper day (threshold {first.threshold:.6g}):")
    print_table(["day", "rows", "flags", "suppressed", "incidents", "alerts"],
                [(day, c["rows"], c["flags"], c["suppressed"], c["incidents"], c["alerts"])
                 for day, c in sorted(first.per_day.items())])
    click.echo(f"alerts: incidents of severity at least {report.alert_severity:g} "
               "([monitor.incidents] alert_severity)")
    bands = ", ".join(f"{band}: {n}" for band, n in first.severity_bands().items())
    click.echo(f"\nseverity of the flags (not suppressed): {bands}")
    click.echo("nothing was written: flags, incidents and the cursor are as they were")

