"""Many monitors in one daemon: poll cadence under a backlog, connections, series.

On a PostgreSQL server this script starts, N monitors (each its own table and an
active model) start with a backlog while a producer adds rows to every table each
second; one in-process worker runs them for a while at a 5 s interval. Measured: the
longest any monitor went without a successful poll (the figure behind the Stalled
alert, which fires past two intervals), the time until every backlog was scored,
the longest such gap once every backlog was scored, the most PostgreSQL connections
the worker held, the connections it still held at the end,
and the series per monitor in one scrape over HTTP. The baseline, in the same run,
is the worker with the old poll budget (0.9 of the interval, at least 5 s, however
many monitors share its threads) and Arrow readers kept between polls.

    python -m benchmarks.many_monitors [--runs 50:5 200:5 200:15] [--seconds 60] [--output FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import threading
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

FEATURES = [f"f{i}" for i in range(6)]
#: Rows to score at the start, over all monitors (each table gets its share).
BACKLOG_TOTAL_ROWS = 150_000
TRICKLE_ROWS = 5
RESULTS = Path(__file__).parent / "results" / "many-monitors.md"


def _tables(engine: sa.Engine, count: int) -> list[sa.Table]:
    metadata = sa.MetaData()
    tables = [sa.Table(f"t{i}", metadata, sa.Column("id", sa.BigInteger, primary_key=True),
                       sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
                       *(sa.Column(f, sa.Float) for f in FEATURES)) for i in range(count)]
    metadata.create_all(engine)
    return tables


def _rows(rng: np.random.Generator, n: int, start: dt.datetime) -> list[dict]:
    latent = rng.normal(size=(n, 2))
    values = np.hstack([latent, latent @ rng.normal(size=(2, 4))]) + 0.05 * rng.normal(
        size=(n, 6))
    return [{"ts": start + dt.timedelta(seconds=i),
             **{f: float(v) for f, v in zip(FEATURES, row, strict=True)}}
            for i, row in enumerate(values)]


def _monitors(engine: sa.Engine, tables: list[sa.Table], interval: float) -> list:
    """A trained model for the first table, stored and activated for every monitor."""
    from anomaly_monitor.calibration import Threshold
    from anomaly_monitor.config import MonitorSettings, ThresholdSettings
    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.registry import (
        activate,
        calibration_scores,
        get_version,
        load_model,
        store_version,
    )

    rng = np.random.default_rng(0)
    with engine.begin() as connection:
        connection.execute(tables[0].insert(), _rows(rng, 2_000, dt.datetime(2026, 1, 1,
                                                                              tzinfo=dt.UTC)))
    monitors = [MonitorSettings(
        name=f"m{i}", table=t.name, timestamp_column="ts", features=tuple(FEATURES),
        kind="dae", interval_seconds=interval, batch_size=1_000,
        threshold=ThresholdSettings(method="quantile", target_fpr=0.01),
        model={"n_estimators": 1, "epochs": 5}) for i, t in enumerate(tables)]
    train_monitor(engine, monitors[0], device="cpu")
    with engine.begin() as connection:
        version = get_version(connection, "m0", 1)
        model = load_model(connection, "m0", 1, device="cpu")
        scores = calibration_scores(connection, "m0", 1)
        threshold = Threshold(version.threshold, version.threshold_method,
                              dict(version.threshold_params))
        for monitor in monitors[1:]:
            stored = store_version(connection, monitor.name, model.detector, threshold,
                                   scores, training={}, validation={})
            activate(connection, monitor.name, stored.version, initial_position=lambda: 0)
        connection.execute(sa.text("UPDATE am_cursors SET position = 0"))
    return monitors


class _Producer(threading.Thread):
    def __init__(self, engine: sa.Engine, tables: list[sa.Table]) -> None:
        super().__init__(daemon=True)
        self.engine, self.tables, self.stop = engine, tables, threading.Event()
        self.rng = np.random.default_rng(1)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            now = dt.datetime.now(dt.UTC)
            with self.engine.begin() as connection:
                for table in self.tables:
                    connection.execute(table.insert(), _rows(self.rng, TRICKLE_ROWS, now))


def _last_successes(registry: object) -> dict[str, float]:
    return {sample.labels["monitor"]: sample.value
            for family in registry.collect()  # type: ignore[attr-defined]
            if family.name == "anomaly_monitor_last_success_timestamp_seconds"
            for sample in family.samples}


def _connections(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
            "'anomaly-monitor %'")).scalar())


def _run(url: str, admin: sa.Engine, tables: list[sa.Table], monitors: list, seconds: float,
         *, baseline: bool) -> dict[str, float]:
    """One worker over ``monitors`` for ``seconds``; its figures."""
    from prometheus_client import CollectorRegistry

    from anomaly_monitor.config import Settings
    from anomaly_monitor.db import create_engine
    from anomaly_monitor.metrics import Metrics
    from anomaly_monitor.worker import Worker
    from tests.helpers import scrape

    backlog = BACKLOG_TOTAL_ROWS // len(tables)
    with admin.begin() as connection:  # every table: the same backlog, scored afresh
        connection.execute(sa.text("DELETE FROM am_anomalies"))
        connection.execute(sa.text("DELETE FROM am_quarantine"))
        connection.execute(sa.text("DELETE FROM am_batches"))
        connection.execute(sa.text("UPDATE am_cursors SET position = 0, lease_owner = NULL"))
        for table in tables:
            connection.execute(table.delete())
            connection.execute(table.insert(), _rows(np.random.default_rng(2), backlog,
                                                     dt.datetime(2026, 1, 2, tzinfo=dt.UTC)))
    engine = create_engine(url)
    registry = CollectorRegistry()
    worker = Worker(Settings(path=None, database_url=url, metrics_port=0,
                             monitors=tuple(monitors)), engine, Metrics(registry), device="cpu")
    if baseline:
        for runner in worker.runners.values():
            runner.share = 1.0
    loading = time.monotonic()
    worker.preload_models()  # timed apart: run_forever finds them loaded
    preload = time.monotonic() - loading
    polls = [0]
    poll = worker.poll

    def counted(name: str, **kwargs: object) -> object:
        polls[0] += 1
        return poll(name, **kwargs)  # type: ignore[arg-type]

    worker.poll = counted  # type: ignore[method-assign]
    producer = _Producer(admin, tables)
    thread = threading.Thread(target=worker.run_forever, kwargs={"install_signals": False})
    start = time.monotonic()
    thread.start()
    producer.start()
    worst, steady, held, caught_up, caught_up_at = 0.0, 0.0, 0, None, 0.0
    last = {m.name: time.time() for m in monitors}
    while time.monotonic() - start < seconds:
        time.sleep(0.25)
        now = time.time()
        successes = _last_successes(registry)  # one pass: get_sample_value collects all
        for name in last:
            last[name] = max(last[name], successes.get(name, 0.0))
            worst = max(worst, now - last[name])
            if caught_up is not None:  # gaps that began after every backlog was scored
                steady = max(steady, now - max(last[name], caught_up_at))
        held = max(held, _connections(admin))
        if caught_up is None:
            with admin.connect() as connection:
                scored = connection.execute(sa.text(
                    "SELECT count(*) FROM am_cursors WHERE position >= :n"),
                    {"n": backlog}).scalar()
            if scored == len(monitors):
                caught_up, caught_up_at = time.monotonic() - start, time.time()
    idle = _connections(admin)
    series = sum(1 for line in scrape(registry).splitlines()
                 if line and not line.startswith("#"))
    producer.stop.set()
    worker.stop()
    thread.join()
    engine.dispose()
    return {"worst_gap_s": worst, "caught_up_s": caught_up or float("nan"),
            "steady_gap_s": steady if caught_up is not None else float("nan"),
            "preload_s": preload,
            "max_connections": held, "idle_connections": idle,
            "series_per_monitor": series / len(monitors), "polls_per_s": polls[0] / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["50:5", "200:5", "200:15"],
                        help="MONITORS:INTERVAL_SECONDS pairs")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from anomaly_monitor import migrate
    from tests.pgserver import running_server

    lines = ["# Many monitors in one worker (python -m benchmarks.many_monitors)", "",
             "PostgreSQL, one worker (8 threads); the tables start with "
             f"{BACKLOG_TOTAL_ROWS} rows to score between them and each gets {TRICKLE_ROWS} "
             f"more a second; {args.seconds:.0f} s per run, timed after the models are "
             "loaded. Baseline: the old poll budget (0.9 x interval, at least 5 s, whatever "
             "the number of monitors) and Arrow readers kept between polls.", "",
             "| monitors | interval (s) | worker | models loaded (s) | longest without a "
             "successful poll (s) | the same once caught up (s) | all caught up (s) | "
             "max connections | connections at the end | series per monitor | polls/s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(running_server())
        for run in args.runs:
            count, interval = int(run.split(":")[0]), float(run.split(":")[1])
            url = server.url(server.create_database(template=None))
            # Not this package's engine: its connections are not named like a worker's.
            admin = sa.create_engine(url)
            migrate.upgrade(admin)
            tables = _tables(admin, count)
            monitors = _monitors(admin, tables, interval)
            figures = {mode: _run(url, admin, tables, monitors, args.seconds,
                                  baseline=mode == "baseline")
                       for mode in ("baseline", "fair share")}
            for mode, f in figures.items():
                lines.append(f"| {count} | {interval:.0f} | {mode} | {f['preload_s']:.1f} | "
                             f"{f['worst_gap_s']:.1f} | {f['steady_gap_s']:.1f} | "
                             f"{f['caught_up_s']:.1f} | {f['max_connections']} | "
                             f"{f['idle_connections']} | {f['series_per_monitor']:.0f} | "
                             f"{f['polls_per_s']:.1f} |")
            base, new = figures["baseline"], figures["fair share"]
            lines.append(f"| {count} | {interval:.0f} | ratio baseline/fair | | "
                         f"{base['worst_gap_s'] / new['worst_gap_s']:.2f}x | | "
                         f"{base['caught_up_s'] / new['caught_up_s']:.2f}x | "
                         f"{base['max_connections'] / new['max_connections']:.2f}x | | | |")
            admin.dispose()
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
