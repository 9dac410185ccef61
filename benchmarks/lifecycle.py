"""Models that keep up with the data: a drifting stream scored by a static model and by
one the daemon retrains on drift, and the cost of a challenger scoring in shadow.

    python -m benchmarks.lifecycle [--databases sqlite postgresql] [--backlog 200000]

1. **Drifting stream** (per database, in one run): a week of history (one row a
   minute, 16 correlated features, 1% labelled anomalies) trains two monitors on the
   same table with the defaults; six more days arrive in hourly chunks, each followed
   by ``run --once`` (the daemon's poll). Halfway (day 3) every feature's mean moves
   by one standard deviation. ``static`` has no ``[monitor.retrain]``; ``adaptive``
   has ``on_drift = true``, ``window_rows = 1440`` (a day), ``shadow_rows = 720``,
   ``promote = "auto"``. Reported: false flags (flags of rows not labelled) per day,
   when drift (of a feature or of the scores) passed its level, when the challenger
   began to score in shadow and when it was promoted (source time after the shift),
   and the anomalies each caught.
2. **Shadow overhead**: a backlog of rows after two monitors' cursors on one table,
   one with a challenger (``train --no-activate``), caught up by ``run --once`` each;
   rows/s with the challenger against without, same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.pipeline import cli, databases, timed_process

N_FEATURES = 16
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
ROWS_PER_DAY = 1440
HISTORY_DAYS = 7
STREAM_DAYS = 6
SHIFT_DAY = 3
CHUNK_ROWS = 60
ANOMALY_RATE = 0.01
#: The shift, in standard deviations of each feature.
SHIFT_SD = 1.0
RESULTS = Path(__file__).parent / "results" / "lifecycle.md"
STREAM_MONITORS = ("static", "adaptive")
OVERHEAD_MONITORS = ("alone", "with_challenger")
#: Catch-ups per monitor (the best is reported), in alternating order.
OVERHEAD_REPEATS = 3
RETRAIN = ('\n[monitor.retrain]\non_drift = true\nwindow_rows = 1440\nshadow_rows = 720\n'
           'promote = "auto"\n')


def make_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows on a 4-D linear manifold; ``ANOMALY_RATE`` of them (labelled) break it."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(4, N_FEATURES))
    x = rng.normal(size=(n, 4)) @ mixing + 0.1 * rng.normal(size=(n, N_FEATURES))
    bad = rng.random(n) < ANOMALY_RATE
    x[bad] = rng.normal(size=(int(bad.sum()), N_FEATURES)) * 3
    return x, bad


def create_table(engine: Any) -> Any:
    """The source table ``readings``: id, timestamp, the features, a 0/1 label."""
    import sqlalchemy as sa

    metadata = sa.MetaData()
    table = sa.Table("readings", metadata,
                     sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                               primary_key=True, autoincrement=True),
                     sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
                     *(sa.Column(f, sa.Float) for f in FEATURES),
                     sa.Column("label", sa.Integer, nullable=False))
    metadata.create_all(engine)
    return table


def insert(engine: Any, table: Any, x: np.ndarray, bad: np.ndarray, start: dt.datetime,
           first: int) -> None:
    """Rows one minute apart, the ``first``-th at ``start + first`` minutes."""
    rows = [{"ts": start + dt.timedelta(minutes=first + i), "label": int(bad[i]),
             **{f: float(v) for f, v in zip(FEATURES, x[i], strict=True)}}
            for i in range(len(x))]
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)


def config_text(url: str, monitors: dict[str, str]) -> str:
    """A config with ``monitors`` (name: extra TOML) on ``readings``."""
    features = ", ".join(f'"{f}"' for f in FEATURES)
    body = "".join(f'[[monitor]]\nname = "{name}"\ntable = "readings"\ntimestamp_column = "ts"\n'
                   f"features = [{features}]\nbatch_size = 10000\n{extra}\n"
                   for name, extra in monitors.items())
    return f'[database]\nurl = "{url}"\n\n[metrics]\nport = 0\n\n{body}'


def drifting_stream(url: str, workdir: Path) -> dict[str, Any]:
    """Part 1 on the database at ``url``."""
    import sqlalchemy as sa
    from prometheus_client import CollectorRegistry

    from anomaly_monitor.config import load_settings
    from anomaly_monitor.db import create_engine
    from anomaly_monitor.drift import DRIFT_LEVEL
    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.metrics import Metrics
    from anomaly_monitor.migrate import upgrade
    from anomaly_monitor.tables import anomalies, batches, drift, shadow_batches
    from anomaly_monitor.worker import Worker

    engine = create_engine(url)
    upgrade(engine)
    table = create_table(engine)
    history = HISTORY_DAYS * ROWS_PER_DAY
    total = history + STREAM_DAYS * ROWS_PER_DAY
    x, bad = make_rows(total, seed=11)
    shift_at = history + SHIFT_DAY * ROWS_PER_DAY
    x[shift_at:] += SHIFT_SD * x[:history].std(axis=0)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    insert(engine, table, x[:history], bad[:history], start, 0)
    path = workdir / "stream.toml"
    path.write_text(config_text(url, {"static": "", "adaptive": RETRAIN}))
    settings = load_settings(path)
    for name in STREAM_MONITORS:
        train_monitor(engine, settings.monitor(name), device="cpu")
    worker = Worker(settings, engine, Metrics(CollectorRegistry()), device="cpu")
    drift_seen: dt.datetime | None = None
    for first in range(history, total, CHUNK_ROWS):
        insert(engine, table, x[first:first + CHUNK_ROWS], bad[first:first + CHUNK_ROWS],
               start, first)
        worker.run_once()
        if drift_seen is None and first >= shift_at:
            with engine.connect() as connection:
                row = connection.execute(sa.select(drift.c.drift_score, drift.c.score_drift)
                                         .where(drift.c.monitor == "adaptive")).first()
            if row is not None and max(row) >= DRIFT_LEVEL:  # what triggers a retrain
                drift_seen = start + dt.timedelta(minutes=first + CHUNK_ROWS - 1)
    shift_time = start + dt.timedelta(minutes=shift_at)
    with engine.connect() as connection:
        flags = connection.execute(sa.select(anomalies.c.monitor, anomalies.c.source_id,
                                             anomalies.c.model_version)).all()
        promoted = connection.execute(
            sa.select(sa.func.min(batches.c.first_id)).where(
                batches.c.monitor == "adaptive", batches.c.model_version > 1)).scalar()
        shadowed = connection.execute(
            sa.select(sa.func.min(shadow_batches.c.first_id)).where(
                shadow_batches.c.monitor == "adaptive")).scalar()
    engine.dispose()
    labelled = {i + 1 for i in np.flatnonzero(bad)}  # ids start at 1
    days: dict[str, list[int]] = {m: [0] * STREAM_DAYS for m in STREAM_MONITORS}
    caught = dict.fromkeys(STREAM_MONITORS, 0)
    for flag in flags:
        day = (flag.source_id - 1 - history) // ROWS_PER_DAY
        if flag.source_id in labelled:
            caught[flag.monitor] += 1
        elif 0 <= day < STREAM_DAYS:
            days[flag.monitor][day] += 1
    stream_anomalies = sum(1 for i in labelled if i > history)
    return {"days": days, "caught": caught, "anomalies": stream_anomalies,
            "drift_hours": None if drift_seen is None
            else (drift_seen - shift_time).total_seconds() / 3600,
            "shadow_hours": None if shadowed is None else (shadowed - 1 - shift_at) / 60,
            "promoted_hours": None if promoted is None
            else (promoted - 1 - shift_at) / 60}


def shadow_overhead(url: str, workdir: Path, backlog: int) -> dict[str, float]:
    """Part 2: rows/s of ``run --once`` with a challenger in shadow against without."""
    import subprocess

    import sqlalchemy as sa

    from anomaly_monitor.db import create_engine
    from anomaly_monitor.migrate import upgrade
    from anomaly_monitor.tables import batches, shadow_batches

    engine = create_engine(url)
    upgrade(engine)
    table = create_table(engine)
    x, bad = make_rows(20_000 + backlog, seed=3)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    insert(engine, table, x[:20_000], bad[:20_000], start, 0)
    path = workdir / "overhead.toml"
    path.write_text(config_text(url, dict.fromkeys(OVERHEAD_MONITORS, "")))
    for name in OVERHEAD_MONITORS:
        subprocess.run(cli(path, "train", name, "--device", "cpu"), check=True,
                       capture_output=True)
    subprocess.run(cli(path, "train", "with_challenger", "--no-activate", "--device", "cpu"),
                   check=True, capture_output=True)
    for lo in range(20_000, 20_000 + backlog, 50_000):
        hi = min(lo + 50_000, 20_000 + backlog)
        insert(engine, table, x[lo:hi], bad[lo:hi], start, lo)
    seconds: dict[str, list[float]] = {name: [] for name in OVERHEAD_MONITORS}
    for rep in range(OVERHEAD_REPEATS):  # alternating order; the cursor moved back between
        for name in OVERHEAD_MONITORS[::1 if rep % 2 == 0 else -1]:
            if rep:
                subprocess.run(cli(path, "cursor", name, "--reset-to", "20000", "--force"),
                               check=True, capture_output=True)
            seconds[name].append(timed_process(cli(path, "run", "--once", "-m", name,
                                                   "--device", "cpu"))[0])
    # The start-up of a pass with nothing left to do, taken off.
    startup, _ = timed_process(cli(path, "run", "--once", "-m", "with_challenger", "--device",
                                   "cpu"))
    rates = {name: backlog / max(min(s) - startup, 1e-9) for name, s in seconds.items()}
    with engine.connect() as connection:  # the challenger did score every row in shadow
        shadowed, shadow_seconds = connection.execute(
            sa.select(sa.func.sum(shadow_batches.c.rows), sa.func.sum(shadow_batches.c.seconds))
            .where(shadow_batches.c.monitor == "with_challenger")).one()
        batch_seconds = connection.execute(sa.select(sa.func.sum(batches.c.duration_seconds))
                                           .where(batches.c.monitor == "with_challenger")
                                           ).scalar()
    engine.dispose()
    if shadowed != OVERHEAD_REPEATS * backlog:
        raise RuntimeError(f"the challenger scored {shadowed} rows in shadow, not "
                           f"{OVERHEAD_REPEATS} x {backlog}")
    return {"alone": rates["alone"], "with_challenger": rates["with_challenger"],
            "ratio": rates["with_challenger"] / rates["alone"],
            "shadow_share": float(shadow_seconds) / float(batch_seconds)}


def _hours(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} h"


def render(results: dict[str, dict[str, Any]], backlog: int, parts: list[str]) -> str:
    """The markdown tables of the parts run."""
    lines: list[str] = [] if "stream" not in parts else [
             f"Drifting stream: {HISTORY_DAYS} days of history, then {STREAM_DAYS} days "
             f"(one row a minute, {N_FEATURES} features, {ANOMALY_RATE:.0%} labelled "
             f"anomalies); every feature shifts by {SHIFT_SD:g} standard deviation at the "
             f"start of day {SHIFT_DAY}. False flags per day:", "",
             "| database | monitor | " + " | ".join(f"day {d}" for d in range(STREAM_DAYS))
             + " | anomalies caught | drift seen after | challenger from | promoted after |",
             "|---|---|" + "---:|" * (STREAM_DAYS + 4)]
    for db, r in results.items() if "stream" in parts else ():
        s = r["stream"]
        for m in STREAM_MONITORS:
            adaptive = m == "adaptive"
            lines.append(f"| {db} | {m} | " + " | ".join(str(v) for v in s["days"][m])
                         + f" | {s['caught'][m]} of {s['anomalies']} | "
                         + (f"{_hours(s['drift_hours'])} | {_hours(s['shadow_hours'])} | "
                            f"{_hours(s['promoted_hours'])} |" if adaptive else "- | - | - |"))
    if "overhead" not in parts:
        return "\n".join(lines) + "\n"
    lines += ["", f"Shadow overhead: `run --once` catching up {backlog:,} rows (same run; the "
              f"best of {OVERHEAD_REPEATS} each, in alternating order):", "",
              "| database | rows/s alone | rows/s with a challenger in shadow | ratio "
              "| the challenger's share of its batches' time |",
              "|---|---:|---:|---:|---:|"]
    for db, r in results.items():
        o = r["overhead"]
        lines.append(f"| {db} | {o['alone']:,.0f} | {o['with_challenger']:,.0f} "
                     f"| {o['ratio']:.2f}x | {o['shadow_share']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the parts asked for and print (and, for a default run, write) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--parts", nargs="+", default=["stream", "overhead"],
                        choices=["stream", "overhead"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="am-lifecycle-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        for name in args.databases:
            parts = {}
            for part in args.parts:
                where = workdir / f"{name}-{part}"
                where.mkdir(mode=0o755)
                with databases([name], where) as dbs:
                    parts[part] = (drifting_stream(dbs[0].url, where) if part == "stream"
                                   else shadow_overhead(dbs[0].url, where, args.backlog))
                print(f"{name} {part}: {parts[part]}", flush=True)
            results[name] = parts
    table = render(results, args.backlog, args.parts)
    print(table)
    output = args.output or (RESULTS if argv is None and len(sys.argv) == 1 else None)
    if output is not None:
        command = " ".join(["python -m benchmarks.lifecycle", *(argv or sys.argv[1:])])
        output.write_text(f"# Model lifecycle benchmark (`{command}`)\n\n{table}")


if __name__ == "__main__":
    main()
