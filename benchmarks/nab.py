"""The Numenta Anomaly Benchmark through the daemon's own code path.

    python -m benchmarks.nab [--data DIR] [--labels FILE] [--results OUT]
        [--detector NAME] [--score] [--jobs 2]

For every ``DIR/<category>/<file>.csv`` (``timestamp,value``) with labels: the file
is loaded into a SQLite table, a window monitor with the default settings is
trained on its probationary period (the first ``min(floor(0.15 n), 750)`` rows, as
NAB defines it), its cursor is put at the period's end, and ``run_batch`` (the
daemon's step) scores the rest, batch by batch. The threshold is set below every
score, so that ``am_anomalies`` holds every row's score; ``OUT/<category>/NAME_<file>.csv``
gets ``timestamp,value,anomaly_score,label`` with

    anomaly_score = s / (s + SCORE_SCALE)

for the monitor's score ``s`` (``-log10`` of the row's tail probability under its own
series' calibration, the same meaning on every series) and 0 in the probationary
period. ``label`` is 1 inside a label window. With ``--score`` the result files are
scored as NAB does (``benchmarks.nab_score``) and printed beside the published
detectors' scores on these files (``nab/reference/README.md``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import sqlalchemy as sa

from benchmarks import nab_score

#: ``anomaly_score = s / (s + SCORE_SCALE)``: a tail probability of 10**-10 scores 0.5.
SCORE_SCALE = 10.0
#: Rows per batch (the daemon's default).
BATCH_ROWS = 10_000
REFERENCE = nab_score.NAB_DIR / "reference" / "README.md"


def _rows(path: Path) -> list[tuple[dt.datetime, float]]:
    with path.open(newline="") as handle:
        return [(nab_score.parse_time(r["timestamp"]), float(r["value"]))
                for r in csv.DictReader(handle)]


def incident_onsets(scores: dict[int, float], times: list[dt.datetime], threshold: float,
                    gap_seconds: float) -> set[int]:
    """The ids (1-based rows) that open an incident: the first flag (score above
    ``threshold``) of each run of flags, grouped as the daemon groups them."""
    from anomaly_monitor.incidents import group

    flags = [{"source_id": i, "source_timestamp": times[i - 1].replace(tzinfo=dt.UTC),
              "entity": None, "severity": 0.0, "model_version": 1, "contributions": []}
             for i, score in scores.items() if score > threshold]
    grouping = group(flags, [], monitor="nab", generation=0, gap_seconds=gap_seconds,
                     now=dt.datetime.now(dt.UTC))
    return {min(i.flags, key=lambda f: (f["source_timestamp"], f["source_id"]))["source_id"]
            for i in grouping.touched}


def score_file(path: Path, name: str, overrides: dict[str, object] | None = None,
               alerts: str = "rows") -> list[float]:
    """Every row's anomaly score in [0, 1] from a window monitor over the file; with
    ``alerts = "incidents"`` only the row that opens an incident keeps a score above the
    monitor's threshold (the others are capped at it): one alert per incident."""
    import torch

    from anomaly_monitor.batch import run_batch
    from anomaly_monitor.config import (
        IncidentSettings,
        MonitorSettings,
        ThresholdSettings,
        WindowSettings,
    )
    from anomaly_monitor.incidents import incident_gap
    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.migrate import upgrade
    from anomaly_monitor.registry import ModelCache
    from anomaly_monitor.report import move_cursor
    from anomaly_monitor.source import reflect_source
    from anomaly_monitor.tables import anomalies

    torch.set_num_threads(1)
    rows = _rows(path)
    probation = nab_score.probation_rows(len(rows))
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/nab.db")
        upgrade(engine)
        table = sa.Table("series", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("timestamp", sa.DateTime), sa.Column("value", sa.Float))
        table.create(engine)
        with engine.begin() as connection:
            connection.execute(table.insert(), [
                {"id": i + 1, "timestamp": t, "value": v} for i, (t, v) in enumerate(rows)])
        monitor = MonitorSettings(
            name=re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60] or "series", table="series",
            timestamp_column="timestamp", features=("value",), window=WindowSettings(),
            batch_size=BATCH_ROWS)
        overrides = dict(overrides or {})
        window = {k: overrides.pop(k) for k in ("size", "derived", "baseline_half_life")
                  if k in overrides}
        if window:
            monitor = replace(monitor, window=replace(monitor.window, **window))
        if "gap_seconds" in overrides:
            monitor = replace(monitor, incidents=IncidentSettings(
                gap_seconds=float(overrides.pop("gap_seconds"))))
        if "kind" in overrides:
            monitor = replace(monitor, kind=str(overrides.pop("kind")))
        if overrides:  # detector hyperparameters
            monitor = replace(monitor, model=overrides)
        # Train on the probationary period with the default threshold, then flag
        # every row so that each one's score is stored.
        report = train_monitor(engine, monitor, until=rows[probation][0], device="cpu")
        everything = replace(monitor, threshold=ThresholdSettings(method="fixed", value=-1.0))
        from anomaly_monitor.calibration_plan import apply_calibration, plan_calibration

        apply_calibration(engine, everything, plan_calibration(
            engine, everything, everything.threshold, recent_rows=0))
        with engine.begin() as connection:
            move_cursor(connection, monitor, probation, force=True)
            source = reflect_source(connection, monitor)
        models = ModelCache(device="cpu")
        while run_batch(engine, monitor, source, models).status == "committed":
            pass
        with engine.connect() as connection:
            scored = dict(connection.execute(
                sa.select(anomalies.c.source_id, anomalies.c.score)
                .where(anomalies.c.monitor == monitor.name)).all())
        engine.dispose()
    if alerts == "incidents":
        threshold = report.version.threshold
        onsets = incident_onsets(scored, [t for t, _ in rows], threshold,
                                 incident_gap(monitor, report.version))
        scored = {i: s if i in onsets else min(s, threshold) for i, s in scored.items()}
    return [0.0 if i < probation else
            max(0.0, scored.get(i + 1, 0.0)) / (max(0.0, scored.get(i + 1, 0.0)) + SCORE_SCALE)
            for i in range(len(rows))]


def _write(out: Path, path: Path, name: str, detector: str, scores: list[float],
           windows: list[tuple[dt.datetime, dt.datetime]]) -> None:
    with path.open(newline="") as handle:  # timestamps and values as the data file has them
        rows = [(nab_score.parse_time(r["timestamp"]), r["value"], r["timestamp"])
                for r in csv.DictReader(handle)]
    target = out / name.split("/")[0] / f"{detector}_{path.name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value", "anomaly_score", "label"])
        for (when, value, text), score in zip(rows, scores, strict=True):
            label = int(any(a <= when <= b for a, b in windows))
            writer.writerow([text, value, f"{score:.10f}", label])


def _task(args: tuple[Path, str, dict[str, object], str]) -> tuple[str, list[float], float]:
    path, name, overrides, alerts = args
    started = time.perf_counter()
    return name, score_file(path, name, overrides, alerts), time.perf_counter() - started


def reference_table() -> list[str]:
    """The published detectors' rows of the reference table."""
    if not REFERENCE.exists():
        return []
    return [line for line in REFERENCE.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| detector")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=nab_score.NAB_DIR)
    parser.add_argument("--labels", type=Path, default=nab_score.DEFAULT_LABELS)
    parser.add_argument("--results", type=Path, default=Path("nab-results"))
    parser.add_argument("--detector", default="anomalymonitor")
    parser.add_argument("--score", action="store_true", help="Score the result files.")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--files", nargs="*", help="Only these <category>/<file>.csv.")
    parser.add_argument("--alerts", choices=("rows", "incidents"), default="rows",
                        help="rows: every row's score; incidents: one alert per incident "
                        "(only its first flag keeps a score above the threshold).")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="Experiments only (the reported figures use the defaults): "
                        "window (size, derived, baseline_half_life), kind or detector "
                        "settings, e.g. size=8 'derived=[\"diff\"]'.")
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if "derived" in overrides:
        overrides["derived"] = tuple(overrides["derived"])
    if "baseline_half_life" in overrides:
        overrides["baseline_half_life"] = float(overrides["baseline_half_life"])
    labels = nab_score.load_labels(args.labels)
    tasks = [(args.data / name, name, overrides, args.alerts) for name in sorted(labels)
             if (args.data / name).exists() and (not args.files or name in args.files)]
    if not tasks:
        raise SystemExit(f"no labelled NAB files under {args.data}")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for name, scores, seconds in pool.map(_task, tasks):
            _write(args.results, args.data / name, name, args.detector, scores, labels[name])
            print(f"{name}: {len(scores)} rows in {seconds:.1f} s", flush=True)
    print(f"{len(tasks)} files in {time.perf_counter() - started:.0f} s; results in "
          f"{args.results}")
    if args.score:
        files = nab_score.load_results(args.results, args.detector, labels)
        n_windows = sum(len(labels[name]) for name in files)
        results = nab_score.score_detector(files, n_windows)
        print(f"\n{args.detector}: {len(files)} files, {n_windows} label windows; "
              f"settings {overrides or 'default'}; alerts per {args.alerts[:-1]}\n")
        print("| detector | standard | reward low FP | reward low FN |\n|---|---:|---:|---:|")
        print(f"| **{args.detector} (this run)** | " +
              " | ".join(f"**{r.score:.1f}**" for r in results) + " |")
        for line in reference_table():
            print(line)
        print("\n| profile | threshold | raw |\n|---|---:|---:|")
        for r in results:
            print(f"| {r.profile.name} | {r.threshold:.6g} | {r.raw:.3f} |")


if __name__ == "__main__":
    main()
