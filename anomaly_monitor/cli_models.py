"""``train``, ``calibrate`` and ``models``: making, tuning and choosing model versions."""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import sqlalchemy as sa

from anomaly_monitor.calibration import DEFAULT_METHOD
from anomaly_monitor.cli import (
    DATETIME,
    EXIT_USAGE,
    App,
    CliError,
    Group,
    check_device,
    check_threshold_options,
    echo_json,
    main,
    pass_app,
    print_table,
    require_schema,
)
from anomaly_monitor.config import (
    THRESHOLD_METHODS,
    MonitorSettings,
    ThresholdSettings,
    check_model_params,
)
from anomaly_monitor.tables import as_utc

if TYPE_CHECKING:
    from anomaly_monitor.calibration_plan import CalibrationPlan
    from anomaly_monitor.registry import ModelVersion

# -- train / calibrate ------------------------------------------------------------------

@main.command()
@click.argument("monitor")
@click.option("--since", type=DATETIME, help="Oldest row (UTC).")
@click.option("--until", type=DATETIME, help="Rows before this (UTC).")
@click.option("--limit", type=click.IntRange(min=1), help="Train on the newest N rows.")
@click.option("--epochs", type=click.IntRange(min=1), help="Maximum training epochs.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--activate/--no-activate", default=True, show_default=True,
              help="Make the new version active.")
@click.option("--exclude-flagged", is_flag=True,
              help="Also leave out every flagged row (not only those labelled --tp).")
@click.option("--include-labelled", is_flag=True,
              help="Keep the rows labelled true anomalies (anomaly-monitor label --tp) in "
                   "the training window; by default they are left out.")
@pass_app
def train(app: App, monitor: str, since: dt.datetime | None, until: dt.datetime | None,
          limit: int | None, epochs: int | None, device: str, activate: bool,
          exclude_flagged: bool, include_labelled: bool) -> None:
    """Train a new model version of MONITOR on its table (rows labelled true anomalies
    left out)."""
    from anomaly_monitor.lifecycle import train_monitor

    settings = app.settings.monitor(monitor)
    check_device(device)
    check_model_params(app.settings, settings)
    require_schema(app)
    report = train_monitor(
        app.engine, settings, since=as_utc(since), until=as_utc(until), limit=limit, epochs=epochs,
        device=device, activate_version=activate, verbose=sys.stderr.isatty(),
        exclude=[*([] if include_labelled else ["labelled"]), "suppressed",
                 *(["flagged"] if exclude_flagged else [])],
    )
    v = report.version
    left_out = v.training.get("excluded_rows", 0)
    excluded = v.training.get("excluded", {})
    why = ", ".join(f"{excluded[e]} {text}" for e, text in _EXCLUDED.items()
                    if excluded.get(e))
    click.echo(f"monitor {monitor}: version {v.version} ({v.kind}) trained on {report.rows} "
               f"rows, {v.training['holdout_rows']} held out, {report.skipped} skipped, "
               + (f"{left_out} left out ({why}), " if left_out else "")
               + f"in {report.seconds:.1f} s on {v.training['device']}")
    click.echo(f"threshold {v.threshold:.6g} ({v.threshold_method}); held-out flag rate "
               f"{v.validation['holdout_flag_rate']:.4f}")
    if v.validation.get("auroc") is not None:
        click.echo(f"held-out AUROC against {settings.label_column}: "
                   f"{v.validation['auroc']:.3f}")
    if report.activated:
        click.echo("status: active")
    elif v.status == "shadow":
        click.echo(f"status: shadow (a challenger: running workers score it beside the "
                   f"active version, writing no flag; see its gates with: anomaly-monitor "
                   f"models list --monitor {monitor}; promote with: anomaly-monitor models "
                   f"promote {v.version} --monitor {monitor})")
    else:
        click.echo(f"status: candidate (activate with: anomaly-monitor models activate "
                   f"{v.version} --monitor {monitor})")


#: How ``train`` names what it left out.
_EXCLUDED = {"labelled": "labelled true anomalies", "flagged": "flagged rows",
             "suppressed": "suppressed with --skip-training"}


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
@click.option("--version", "version", type=click.IntRange(min=1),
              help="Calibrate this version (e.g. one trained with --no-activate), not the "
                   "active one.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def calibrate(app: App, monitor: str, method: str | None, target_fpr: float | None,
              alerts_per_day: float | None, value: float | None, dry_run: bool,
              plot: str | None, version: int | None, as_json: bool) -> None:
    """Set the threshold of MONITOR's active version (or --version) from its held-out
    scores; the rows after its training window show what each threshold would flag."""
    from anomaly_monitor.calibration_plan import apply_calibration, plan_calibration
    from anomaly_monitor.calibration_plot import plot_calibration
    from anomaly_monitor.lifecycle import method_label

    settings = app.settings.monitor(monitor)
    base = settings.threshold
    chosen_method = method or base.method
    check_threshold_options(chosen_method, {"--target-fpr": target_fpr is not None,
                                            "--alerts-per-day": alerts_per_day is not None,
                                            "--value": value is not None})
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
    if plot:
        check_plot_path(plot)
    require_schema(app)  # after the options: their errors need no database
    plan = plan_calibration(app.engine, settings, threshold_settings, version=version)
    if plot:
        plot_calibration(plan, plot)
    if as_json:
        echo_json(_calibration_json(plan, dry_run))
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
    status = apply_calibration(app.engine, settings, plan)
    number = plan.version.version
    click.echo(f"threshold of version {number} set to {plan.chosen.value:.6g} "
               f"({method_label(plan.chosen)})", err=as_json)
    if status != "active":
        click.echo(f"version {number} is not active; review it, then: anomaly-monitor models "
                   f"activate {number}" + (f" --monitor {monitor}"
                                          if len(app.settings.monitors) > 1 else ""),
                   err=as_json)


def check_plot_path(plot: str) -> None:
    """Refuse a --plot path that cannot be written as a PNG, before any work."""
    path = Path(plot)
    if path.suffix.lower() != ".png":
        raise CliError(f"--plot {plot}: the plot is a PNG; give a path ending in .png",
                       EXIT_USAGE)
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CliError(f"--plot {plot}: directory {parent} does not exist or is not "
                       "writable", EXIT_USAGE)


def _calibration_json(plan: CalibrationPlan, dry_run: bool) -> dict[str, Any]:
    """The ``calibrate --json`` document."""
    return {
        "version": plan.version.version, "chosen": plan.chosen.to_dict(), "dry_run": dry_run,
        "holdout_rows": int(plan.holdout_scores.size),
        "version_status": plan.version.status,
        "recent_rows": int(plan.recent_scores.size),
        "recent_ids": list(plan.recent_ids) if plan.recent_ids else None,
        "labelled_rows": plan.labelled_rows, "labelled_anomalies": plan.labelled_anomalies,
        "labels_from": plan.labels_from,
        "estimated_contamination": plan.contamination,
        "candidates": [{"label": c.label, "method": c.threshold.method,
                        "threshold": c.threshold.value, "holdout_flag_rate": c.holdout_rate,
                        "recent_flagged": c.recent_flagged, "precision": c.precision,
                        "recall": c.recall, "f1": c.f1}
                       for c in plan.candidates],
    }


def _print_calibration(monitor: str, plan: CalibrationPlan) -> None:
    """The ``calibrate`` table: each candidate's flags, and its precision/recall given labels."""
    labelled = (f"; {plan.labelled_rows} labelled rows ({plan.labelled_anomalies} "
                f"anomalies) from the {plan.labels_from}" if plan.labelled_rows else "")
    status = "" if plan.version.status == "active" else f" ({plan.version.status})"
    click.echo(f"monitor {monitor}, version {plan.version.version}{status}: "
               f"{plan.holdout_scores.size} held-out rows{labelled}")
    if plan.recent_ids is not None:
        first, last = plan.recent_ids
        click.echo(f"recent rows: the newest {plan.recent_scores.size} after the training "
                   f"window (ids {first}-{last}), which the model has not seen")
    elif plan.version.training.get("window"):
        click.echo("recent rows: not available for a window monitor yet (its rows score "
                   "only in order, with their entities' states); 'recent flagged' counts "
                   "none; label metrics come from the flags this version scored that "
                   "operators labelled")
    else:
        click.echo("recent rows: none yet after the training window (last id "
                   f"{plan.version.training['last_id']}); 'recent flagged' counts none")
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
    print_table(headers, rows)


# -- models -----------------------------------------------------------------------------

@main.group(cls=Group)
def models() -> None:
    """List, inspect, compare, activate, promote, reject and roll back model versions."""


monitor_option = click.option("--monitor", "-m", "monitor_name",
                               help="Monitor (needed when several are configured).")


@models.command("list")
@monitor_option
@click.option("--json", "as_json", is_flag=True)
@pass_app
def models_list(app: App, monitor_name: str | None, as_json: bool) -> None:
    """List the versions of a monitor, newest first, with the challenger's gates."""
    from anomaly_monitor.cli_lifecycle import gate_rows
    from anomaly_monitor.registry import activation_history, list_versions
    from anomaly_monitor.retraining import judge

    names = ([app.settings.monitor(monitor_name).name] if monitor_name
             else [m.name for m in app.settings.monitors])
    require_schema(app)
    with app.engine.connect() as connection:
        versions = [v for name in names for v in list_versions(connection, name)]
        history = {name: activation_history(connection, name) for name in names}
        judged = {name: judge(connection, app.settings.monitor(name)) for name in names}
    gates = {(name, j.version): [g.to_dict() for g in j.gates]
             for name, j in judged.items() if j is not None}
    if as_json:
        echo_json([{**v.to_dict(), "activations": [
            {"action": a, "at": t.isoformat()} for n, a, t in history[v.monitor]
            if n == v.version], **({"gates": gates[(v.monitor, v.version)]}
                                   if (v.monitor, v.version) in gates else {})}
                   for v in versions])
        return
    print_table(["monitor", "version", "kind", "status", "threshold", "method", "rows", "created"],
           [(v.monitor, v.version, v.kind,
             v.status + (" (pruned)" if v.pruned_at is not None else ""),
             f"{v.threshold:.6g}", v.threshold_method,
             v.training.get("rows"), v.created_at.isoformat(timespec="seconds"))
            for v in versions])
    for name, events in history.items():
        if events:  # what rollback follows, newest last
            steps = " -> ".join(f"{v}{' (rollback)' if a == 'rollback' else ''}"
                                for v, a, _ in events[-10:])
            click.echo(f"monitor {name}: activations, oldest first: {steps}")
    for (name, version), rows in gates.items():
        mode = app.settings.monitor(name).shadow.promote
        click.echo(f"monitor {name}: challenger version {version} in shadow (promote = "
                   f"{mode}); its gates:")
        print_table(["gate", "result", "limit", "detail"], gate_rows(rows))


@models.command("show")
@click.argument("version", type=int)
@monitor_option
@click.option("--json", "as_json", is_flag=True,
              help="Everything recorded, the severity grid included.")
@pass_app
def models_show(app: App, version: int, monitor_name: str | None, as_json: bool) -> None:
    """Summarise VERSION: training, architecture, threshold, held-out scores."""
    from anomaly_monitor.registry import activation_history, get_version

    monitor = app.monitor(monitor_name)
    require_schema(app)
    with app.engine.connect() as connection:
        model = get_version(connection, monitor.name, version)
        history = [(a, t) for v, a, t in activation_history(connection, monitor.name)
                   if v == version]
    if as_json:
        echo_json(model.to_dict())
        return
    for line in _version_summary(model, history):
        click.echo(line)
    click.echo(f"(everything recorded: anomaly-monitor models show {version} --json)")


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def _iso(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC) if value else None


def _version_summary(model: ModelVersion, history: list[tuple[str, dt.datetime]]) -> list[str]:
    """The lines of ``models show`` without ``--json``."""
    training, validation = model.training, model.validation
    architecture = training.get("architecture") or {}
    hidden = "-".join(str(h) for h in architecture.get("hidden_dims", [])) or "-"
    epochs = "/".join(str(e) for e in training.get("epochs_run", []))
    quantiles = validation.get("score_quantiles") or {}
    spread = ", ".join(f"p{float(q) * 100:g} {v:.4g}" for q, v in quantiles.items())
    auroc = validation.get("auroc")
    params = {k: v for k, v in model.threshold_params.items() if k != "calibration_flag_rate"}
    # Set by calibrate with the threshold; the training-time rate for older versions.
    rate = model.threshold_params.get("calibration_flag_rate",
                                      validation.get("holdout_flag_rate"))
    lines = [
        f"monitor {model.monitor}, version {model.version} ({model.kind}): {model.status}, "
        f"created {_when(model.created_at)}",
        f"features ({len(model.features)}): {', '.join(model.features)}",
        f"architecture: hidden layers {hidden}, code size {architecture.get('latent_dim', '-')}"
        f"; {model.hyperparameters.get('n_estimators', 1)} estimator(s), epochs run {epochs} "
        f"of {model.hyperparameters.get('epochs')}; {training.get('device')}, "
        f"{training.get('seconds')} s",
        f"trained on {training.get('rows')} rows, ids {training.get('first_id')}-"
        f"{training.get('holdout_first_id', 0) - 1} ({training.get('skipped_rows', 0)} skipped); "
        f"held out {training.get('holdout_rows')} rows, ids {training.get('holdout_first_id')}-"
        f"{training.get('last_id')}; rows stamped {_when(_iso(training.get('first_timestamp')))}"
        f" to {_when(_iso(training.get('last_timestamp')))}",
        f"threshold {model.threshold:.6g} ({model.threshold_method}"
        + "".join(f", {k} {v}" for k, v in params.items()) + ")"
        + (f", flags {rate:.3%} of the held-out rows" if rate is not None else ""),
        f"held-out scores: {spread or '-'}"
        + (f"; AUROC {auroc:.3f} on the label column" if auroc is not None else ""),
        "hyperparameters: " + ", ".join(f"{k}={v}" for k, v in model.hyperparameters.items()
                                         if v is not None and k not in ("kind", "verbose")),
        f"artifact sha256 {model.artifact_sha256}"
        + (" (removed by retention)" if model.pruned_at is not None else ""),
    ]
    window = training.get("window")
    if window:
        lines.insert(2, f"window monitor: {window['size']} samples before each row, derived "
                        f"{window['derived'] or 'none'}, baseline half-life "
                        f"{window['half_life']:g} samples, entity column "
                        f"{window['entity_column'] or '(none: one stream)'}; "
                        f"{training.get('entities')} entities at training")
    if history:
        lines.append("activations: " + ", ".join(f"{a} {_when(t)}" for a, t in history))
    lines += _lifecycle_lines(model)
    return lines


def _lifecycle_lines(model: ModelVersion) -> list[str]:
    """How the version came and went: its trigger, a challenger's decision, retention."""
    lines = []
    trigger = model.training.get("trigger")
    if trigger and trigger != "manual":
        lines.append(f"trained by the daemon ({trigger})")
    decision = model.validation.get("decision")
    if decision:
        lines.append(f"as a challenger: {decision['action']} by {decision['by']} "
                     f"{_when(_iso(decision.get('at')))}"
                     + (f": {decision['reason']}" if decision.get("reason") else ""))
    if model.pruned_at is not None:
        lines.append(f"artifact removed by retention {_when(model.pruned_at)} (keep_versions); "
                     "it can no longer be activated")
    return lines


def _activation(app: App, monitor_name: str | None,
                action: Callable[[sa.Connection, MonitorSettings], Any]) -> None:
    monitor = app.monitor(monitor_name)
    require_schema(app)
    with app.engine.begin() as connection:
        version = action(connection, monitor)
    click.echo(f"monitor {monitor.name}: version {version.version} is active "
               f"(threshold {version.threshold:.6g}); running workers pick it up at their "
               "next batch")


@models.command("activate")
@click.argument("version", type=int)
@monitor_option
@pass_app
def models_activate(app: App, version: int, monitor_name: str | None) -> None:
    """Make VERSION the active model (after verifying its artifact)."""
    from anomaly_monitor.lifecycle import activate_checked
    from anomaly_monitor.registry import active_version

    monitor = app.monitor(monitor_name)
    require_schema(app)
    with app.engine.connect() as connection:
        if active_version(connection, monitor.name) == version:
            # Not recorded again: the history rollback follows stays as it was.
            click.echo(f"monitor {monitor.name}: version {version} is already active; "
                       "nothing changed")
            return
    _activation(app, monitor_name,
                lambda connection, m: activate_checked(connection, m, None, version))


@models.command("rollback")
@monitor_option
@pass_app
def models_rollback(app: App, monitor_name: str | None) -> None:
    """Re-activate the version that was active before the current one."""
    from anomaly_monitor.lifecycle import rollback

    _activation(app, monitor_name, rollback)
