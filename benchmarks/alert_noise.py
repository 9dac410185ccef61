"""Fewer, better alerts: the same streams alerted per row, per incident, and per
incident after operator feedback.

    python -m benchmarks.alert_noise [--data DIR] [--labels FILE] [--jobs 2]
        [--files CATEGORY/FILE.csv ...]

For every NAB file with labels (``../shared/datasets/nab``): a window monitor with the
defaults is trained on the probationary period (NAB's first ``min(0.15 n, 750)`` rows);
the daemon's step (``run_batch``) scores the first half of the rest (part A), and an
operator labels each of A's incidents from NAB's label windows (``tp`` when it
overlaps one, else ``fp``: ``anomaly-monitor label --incident``). Then part B (the
second half) arrives and is measured three ways, in the same run:

- **per row**: every flag of the version's threshold is an alert (before incidents);
  from ``backtest`` of B;
- **per incident**: an alert per incident (of any severity, and of severity >= 50, the
  default ``alert_severity``); from the same backtest;
- **with feedback**: ``calibrate --method labels`` sets the threshold from A's labels
  (max F1 over the labelled flags) and ``alert_severity`` is set to the level of best
  F1 over A's labelled incidents (``anomaly-monitor feedback`` lists it; 50 when no
  incident of A met a window), then ``run_batch`` scores B; its incidents of at least
  that severity are the alerts (what Alertmanager would receive).

An alert is true when it overlaps a label window (a flag inside one; an incident whose
span meets one); a window is caught when a true alert meets it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import sqlalchemy as sa

from benchmarks import nab_score
from benchmarks.nab import _rows

STAGES = ("per row", "per incident, any severity", "per incident, severity >= 50",
          "with feedback")
FAR = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _meets(first: dt.datetime | None, last: dt.datetime | None,
           windows: list[tuple[dt.datetime, dt.datetime]]) -> list[int]:
    """Indices of the windows the span ``[first, last]`` meets."""
    if first is None or last is None:
        return []
    return [k for k, (a, b) in enumerate(windows) if first <= b and last >= a]


def _tally(spans: list[tuple[dt.datetime | None, dt.datetime | None]],
           windows: list[tuple[dt.datetime, dt.datetime]]) -> Counter[str]:
    caught: set[int] = set()
    counts: Counter[str] = Counter(alerts=len(spans))
    for first, last in spans:
        met = _meets(first, last, windows)
        counts["true" if met else "false"] += 1
        caught.update(met)
    counts["caught"] = len(caught)
    return counts


def measure_file(path: Path, name: str,
                 windows: list[tuple[dt.datetime, dt.datetime]]) -> dict[str, Counter[str]]:
    """The three stages' alerts on part B of one file (and its windows there)."""
    import torch

    from anomaly_monitor.backtest import run_backtest
    from anomaly_monitor.batch import run_batch
    from anomaly_monitor.calibration_plan import apply_calibration, plan_calibration
    from anomaly_monitor.config import (
        ConfigError,
        MonitorSettings,
        ThresholdSettings,
        WindowSettings,
    )
    from anomaly_monitor.feedback import alert_levels, best_alert_level, label
    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.migrate import upgrade
    from anomaly_monitor.registry import ModelCache
    from anomaly_monitor.report import move_cursor
    from anomaly_monitor.source import reflect_source
    from anomaly_monitor.tables import anomalies, incidents

    torch.set_num_threads(1)
    rows = _rows(path)
    probation = nab_score.probation_rows(len(rows))
    split = probation + (len(rows) - probation) // 2
    windows = [(_aware(a), _aware(b)) for a, b in windows]
    b_start = _aware(rows[split][0])
    b_windows = [w for w in windows if w[1] >= b_start]
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/nab.db")
        upgrade(engine)
        table = sa.Table("series", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("timestamp", sa.DateTime), sa.Column("value", sa.Float))
        table.create(engine)

        def insert(first: int, last: int) -> None:
            with engine.begin() as connection:
                connection.execute(table.insert(), [
                    {"id": i + 1, "timestamp": t, "value": v}
                    for i, (t, v) in enumerate(rows[first:last], start=first)])

        insert(0, split)
        monitor = MonitorSettings(
            name=re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "series", table="series",
            timestamp_column="timestamp", features=("value",), window=WindowSettings())
        report = train_monitor(engine, monitor, until=rows[probation][0], device="cpu")
        with engine.begin() as connection:
            move_cursor(connection, monitor, probation, force=True)
            source = reflect_source(connection, monitor)
        models = ModelCache(device="cpu")
        while run_batch(engine, monitor, source, models).status == "committed":
            pass
        with engine.begin() as connection:  # the operator labels part A's incidents
            found = connection.execute(sa.select(incidents.c.id, incidents.c.first_timestamp,
                                                 incidents.c.last_timestamp)).all()
            verdicts = {i.id: "tp" if _meets(_aware(i.first_timestamp),
                                              _aware(i.last_timestamp), windows) else "fp"
                        for i in found}
            for verdict in ("tp", "fp"):
                ids = [i for i, v in verdicts.items() if v == verdict]
                if ids:
                    label(connection, monitor.name, ids, verdict, incident=True,
                          author="benchmark")
        insert(split, len(rows))
        before = run_backtest(engine, monitor, since=b_start, until=FAR).runs[0]
        severity = monitor.incidents.alert_severity
        result = {
            "per row": _tally([(_aware(f["source_timestamp"]),) * 2 for f in before.flags],
                              b_windows),
            "per incident, any severity": _tally([(a, b) for a, b, _ in before.spans],
                                                 b_windows),
            "per incident, severity >= 50": _tally(
                [(a, b) for a, b, s in before.spans if s >= severity], b_windows),
        }
        with engine.connect() as connection:  # what the operator sets from the labels
            level = best_alert_level(alert_levels(connection, monitor.name))
        severity = severity if level is None else level
        try:
            plan = plan_calibration(engine, monitor, ThresholdSettings(method="labels"))
            apply_calibration(engine, monitor, plan)
            recalibrated = True
        except ConfigError:  # no incident of part A met a window: nothing to learn from
            recalibrated = False
        while run_batch(engine, monitor, source, models).status == "committed":
            pass
        with engine.connect() as connection:
            spans = connection.execute(
                sa.select(incidents.c.first_timestamp, incidents.c.last_timestamp)
                .where(incidents.c.last_timestamp >= b_start,
                       incidents.c.max_severity >= severity)).all()
            flags_b = connection.execute(
                sa.select(sa.func.count()).select_from(anomalies).where(
                    anomalies.c.source_id > split)).scalar()
        after = _tally([(_aware(a), _aware(b)) for a, b in spans], b_windows)
        after["flags"] = int(flags_b or 0)
        after["recalibrated"] = int(recalibrated)
        result["with feedback"] = after
        for stage in STAGES[:-1]:
            result[stage]["flags"] = len(before.flags)
        after["alert_severity"] = int(severity)
        for stage in STAGES:
            result[stage]["windows"] = len(b_windows)
            result[stage]["labelled_tp"] = sum(1 for v in verdicts.values() if v == "tp")
            result[stage]["labelled_fp"] = sum(1 for v in verdicts.values() if v == "fp")
        result["per row"]["threshold"] = report.version.threshold
        engine.dispose()
    return result


def _task(args: tuple[Path, str, list[tuple[dt.datetime, dt.datetime]]]
          ) -> tuple[str, dict[str, Counter[str]]]:
    path, name, windows = args
    return name, measure_file(path, name, windows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=nab_score.NAB_DIR)
    parser.add_argument("--labels", type=Path, default=nab_score.DEFAULT_LABELS)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--files", nargs="*", help="Only these <category>/<file>.csv.")
    args = parser.parse_args(argv)
    labels = nab_score.load_labels(args.labels)
    tasks = [(args.data / name, name, labels[name]) for name in sorted(labels)
             if (args.data / name).exists() and (not args.files or name in args.files)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(pool.map(_task, tasks))
    total = {stage: Counter() for stage in STAGES}
    for per_file in results.values():
        for stage in STAGES:
            total[stage].update(per_file[stage])
    files = len(results)
    windows = total["per row"]["windows"] // 1
    print(f"{files} NAB files, part B: {windows} label windows; operators labelled part A's "
          f"{total['per row']['labelled_tp'] + total['per row']['labelled_fp']} incidents "
          f"({total['per row']['labelled_tp']} tp, {total['per row']['labelled_fp']} fp); "
          f"{total['with feedback']['recalibrated']} files recalibrated from them\n")
    print("| alerting | flags | alerts | true | false | precision | windows caught |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in STAGES:
        c = total[stage]
        precision = c["true"] / c["alerts"] if c["alerts"] else float("nan")
        print(f"| {stage} | {c['flags']} | {c['alerts']} | {c['true']} | {c['false']} | "
              f"{precision:.3f} | {c['caught']} of {c['windows']} |")
    levels = Counter(per_file["with feedback"]["alert_severity"] for per_file in results.values())
    print("\nalert_severity set from the labels: " + ", ".join(
        f"{level} in {n} files" for level, n in sorted(levels.items())))
    print("\nper file (alerts per row / per incident / per incident >= 50 / with feedback; "
          "windows caught):")
    for name, per_file in sorted(results.items()):
        print(f"  {name}: " + " / ".join(str(per_file[s]["alerts"]) for s in STAGES)
              + "; " + " / ".join(str(per_file[s]["caught"]) for s in STAGES)
              + f" of {per_file['per row']['windows']}")


if __name__ == "__main__":
    main()
