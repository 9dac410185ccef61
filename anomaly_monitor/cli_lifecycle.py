"""``drift`` and the challenger commands: ``models compare``, ``models promote``,
``models reject`` (``models list`` shows the challenger's gates)."""

from __future__ import annotations

from typing import Any

import click
import sqlalchemy as sa

from anomaly_monitor.cli import (
    EXIT_USAGE,
    App,
    CliError,
    echo_json,
    main,
    pass_app,
    print_table,
    require_schema,
)
from anomaly_monitor.cli_feedback import author_of
from anomaly_monitor.cli_models import models, monitor_option


@main.command()
@click.argument("monitor")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def drift(app: App, monitor: str, as_json: bool) -> None:
    """How far MONITOR's recent rows moved from its active version's training rows:
    the PSI of each feature and of the scores, as the daemon last measured them."""
    from anomaly_monitor.drift import DRIFT_LEVEL, DRIFT_MIN_ROWS, stored_report
    from anomaly_monitor.registry import active_version

    settings = app.settings.monitor(monitor)
    require_schema(app)
    with app.engine.connect() as connection:
        stored = stored_report(connection, settings.name)
        active = active_version(connection, settings.name)
    if stored is None or stored[0].get("version") != active:
        why = ("no active version" if active is None else
               f"version {active} has scored no batch yet (the daemon measures drift)")
        if as_json:
            echo_json({"monitor": settings.name, "version": active, "measured": False,
                       "level": DRIFT_LEVEL, "features": {}, "reason": why})
            return
        click.echo(f"monitor {settings.name}: no drift measured: {why}")
        return
    report, at = stored
    report["features"] = dict(sorted(report["features"].items(), key=lambda kv: -kv[1]))
    if as_json:
        echo_json({"monitor": settings.name, **report, "updated_at": at.isoformat()})
        return
    click.echo(f"monitor {settings.name}: version {report['version']}, {report['rows']} rows "
               f"scored, drift as of {at:%Y-%m-%d %H:%M:%S}Z (PSI; {DRIFT_LEVEL:g} or more "
               "is a significant shift)")
    if not report["measured"]:
        click.echo(f"fewer than {DRIFT_MIN_ROWS} rows scored: not measured yet")
        return
    ranked = sorted(report["features"].items(), key=lambda kv: -kv[1])  # most drifted first
    rows: list[list[Any]] = [[name, f"{value:.3f}", "drifted" if value >= DRIFT_LEVEL else ""]
                             for name, value in ranked]
    rows.append(["(scores)", f"{report['score_drift']:.3f}",
                 "drifted" if report["score_drift"] >= DRIFT_LEVEL else ""])
    print_table(["feature", "psi", ""], rows)
    if report.get("flag_share") is not None and report.get("expected_share") is not None:
        click.echo(f"flagged share of recent rows {report['flag_share']:.4f} (calibrated: "
                   f"{report['expected_share']:.4f})")


def gate_rows(gates: list[dict[str, Any]]) -> list[list[Any]]:
    """A challenger's gates as table rows."""
    mark = {True: "pass", False: "FAIL", None: "pending"}
    return [[g["name"], mark[g["passed"]], g["limit"], g["detail"]] for g in gates]


@models.command("compare")
@click.argument("a", type=int)
@click.argument("b", type=int)
@monitor_option
@click.option("--json", "as_json", is_flag=True)
@pass_app
def models_compare(app: App, a: int, b: int, monitor_name: str | None, as_json: bool) -> None:
    """Show versions A and B side by side: training, threshold, validation, and what
    each did in shadow."""
    from anomaly_monitor.registry import get_version
    from anomaly_monitor.shadow import shadow_totals

    if a == b:
        raise CliError(f"compare two versions, not version {a} with itself", EXIT_USAGE)
    monitor = app.monitor(monitor_name)
    require_schema(app)
    with app.engine.connect() as connection:
        pair = [get_version(connection, monitor.name, v) for v in (a, b)]
        totals = [shadow_totals(connection, monitor.name, v) for v in (a, b)]
    facts = [{
        "version": v.version, "status": v.status, "kind": v.kind,
        "created_at": v.created_at.isoformat(timespec="seconds"),
        "trigger": v.training.get("trigger", "manual"),
        "rows": v.training.get("rows"), "first_id": v.training.get("first_id"),
        "last_id": v.training.get("last_id"), "threshold": v.threshold,
        "calibrated_flag_share": v.expected_ratio(),
        "validation_loss": v.validation.get("loss"),
        "loss_of_the_active_then_on_these_rows": (v.validation.get("active_loss") or {}
                                                  ).get("loss"),
        "auroc": v.validation.get("auroc"),
        "shadow_rows": t.rows, "shadow_flagged": t.flagged, "shadow_overlap": t.overlap,
        "shadow_agreed": t.agreed, "shadow_active_flagged": t.active_flagged,
        "shadow_seconds": round(t.seconds, 3),
    } for v, t in zip(pair, totals, strict=True)]
    if as_json:
        echo_json({"monitor": monitor.name, "versions": facts})
        return

    def show(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    print_table(["", f"version {a}", f"version {b}"],
                [[key, show(facts[0][key]), show(facts[1][key])]
                 for key in facts[0] if key != "version"])


def _require_challenger(connection: sa.Connection, monitor: str, version: int,
                        action: str) -> None:
    """Refuse (exit 2) a version that does not exist or is not the challenger."""
    from anomaly_monitor.registry import get_version

    status = get_version(connection, monitor, version).status  # exit 2 when there is none
    if status != "shadow":
        hint = ("it is active already" if status == "active" else
                f"its status is {status}; models activate {version} activates any version"
                if action == "promote" else f"its status is {status}")
        raise CliError(f"monitor {monitor!r} version {version} is not the challenger in "
                       f"shadow, so there is nothing to {action} ({hint})", EXIT_USAGE)


@models.command("promote")
@click.argument("version", type=int)
@monitor_option
@click.option("--by", help="Who decides (default: the login name).")
@pass_app
def models_promote(app: App, version: int, monitor_name: str | None, by: str | None) -> None:
    """Make the challenger VERSION active now, whatever its gates say (an operator's
    decision overrides them; they are recorded with it)."""
    from anomaly_monitor.lifecycle import activate_checked
    from anomaly_monitor.retraining import judge
    from anomaly_monitor.shadow import record_promotion

    monitor = app.monitor(monitor_name)
    who = author_of(by)
    require_schema(app)
    with app.engine.begin() as connection:
        _require_challenger(connection, monitor.name, version, "promote")
        judgement = judge(connection, monitor)
        gates = judgement.gates if judgement else []
        record_promotion(connection, monitor, version, by=who, gates=gates)
        active = activate_checked(connection, monitor, None, version, action="promote")
    failed = [g.name for g in gates if g.passed is not True]
    click.echo(f"monitor {monitor.name}: promoted challenger version {active.version} "
               f"(threshold {active.threshold:.6g})"
               + (f"; gates not passed: {', '.join(failed)}" if failed else "; every gate "
                  "passed") + "; running workers pick it up at their next batch")


@models.command("reject")
@click.argument("version", type=int)
@monitor_option
@click.option("--reason", default="", help="Why (recorded with the version).")
@click.option("--by", help="Who decides (default: the login name).")
@pass_app
def models_reject(app: App, version: int, monitor_name: str | None, reason: str,
                  by: str | None) -> None:
    """Turn the challenger VERSION down: it stops scoring in shadow."""
    from anomaly_monitor.feedback import NOTE_MAX_CHARS
    from anomaly_monitor.shadow import reject

    monitor = app.monitor(monitor_name)
    if len(reason) > NOTE_MAX_CHARS:
        raise CliError(f"--reason has {len(reason)} characters; at most {NOTE_MAX_CHARS}",
                       EXIT_USAGE)
    who = author_of(by)
    require_schema(app)
    with app.engine.begin() as connection:
        _require_challenger(connection, monitor.name, version, "reject")
        reject(connection, monitor.name, version, by=who, reason=reason)
    click.echo(f"monitor {monitor.name}: rejected challenger version {version}; the active "
               "version goes on scoring")
