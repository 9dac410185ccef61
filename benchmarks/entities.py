"""Window monitors with many entities: catch-up rate against a row monitor on the
same table, and memory per entity.

A SQLite table of ``--entities`` hosts x samples (4 float features, a daily cycle per
host) holds a training period and a backlog. Two monitors on it, trained on the same
rows: a row monitor (each row on its own) and a window monitor (``entity_column =
"host"``, the default window). Each catches up the backlog through ``run_batch`` (the
daemon's step, batches of 10,000 rows), timed in the same run; then the entity states'
bytes and the process's peak resident memory are reported.

    python -m benchmarks.entities [--entities 1000] [--samples 300]
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import tempfile
import time
from dataclasses import replace

import numpy as np
import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings

FEATURES = ("cpu", "mem", "disk", "net")
TRAINING_SHARE = 0.4
EPOCHS = 10


def _load(engine: sa.Engine, entities: int, samples: int, seed: int = 0) -> sa.Table:
    rng = np.random.default_rng(seed)
    table = sa.Table("metrics", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("ts", sa.DateTime(timezone=True)), sa.Column("host", sa.String(16)),
                     *(sa.Column(f, sa.Float) for f in FEATURES))
    table.create(engine)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    levels = rng.uniform(5, 80, (entities, len(FEATURES)))
    next_id = 1
    for step in range(samples):
        cycle = np.sin(2 * np.pi * step / 288)
        values = levels * (1 + 0.3 * cycle) + rng.normal(0, 1, levels.shape)
        rows = [{"id": next_id + e, "ts": start + dt.timedelta(minutes=5 * step),
                 "host": f"host-{e:05d}", **dict(zip(FEATURES, map(float, values[e]), strict=True))}
                for e in range(entities)]
        with engine.begin() as connection:
            connection.execute(table.insert(), rows)
        next_id += entities
    return table


def _catch_up(engine: sa.Engine, monitor: MonitorSettings, start: int) -> tuple[int, float]:
    from anomaly_monitor.batch import ReadState, run_batch
    from anomaly_monitor.registry import ModelCache
    from anomaly_monitor.report import move_cursor
    from anomaly_monitor.source import reflect_source

    with engine.begin() as connection:
        move_cursor(connection, monitor, start, force=True)
        source = reflect_source(connection, monitor)
    models, state, rows = ModelCache("cpu", threads=1), ReadState(), 0
    t0 = time.perf_counter()
    while True:
        result = run_batch(engine, monitor, source, models, read_state=state)
        rows += result.rows
        if result.caught_up:
            break
    state.close()
    return rows, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    from anomaly_monitor.config import WindowSettings
    from anomaly_monitor.entities import count_entities
    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.migrate import upgrade
    from anomaly_monitor.tables import entity_states

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/entities.db")
        upgrade(engine)
        t0 = time.perf_counter()
        _load(engine, args.entities, args.samples)
        total = args.entities * args.samples
        train_rows = int(total * TRAINING_SHARE)
        until = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
            minutes=5 * int(args.samples * TRAINING_SHARE))
        print(f"{total:,} rows ({args.entities:,} entities x {args.samples} samples) loaded "
              f"in {time.perf_counter() - t0:.0f} s; training on the first {train_rows:,}")
        base = MonitorSettings(name="rows", table="metrics", timestamp_column="ts",
                               features=FEATURES, kind="dae", batch_size=10_000,
                               model={"epochs": EPOCHS})
        window = replace(base, name="windows", entity_column="host", window=WindowSettings())
        results = {}
        for monitor in (base, window):
            train_monitor(engine, monitor, until=until, device="cpu")
            rows, seconds = _catch_up(engine, monitor, train_rows)
            results[monitor.name] = (rows, seconds)
        with engine.connect() as connection:
            n_entities = count_entities(connection, "windows", 1)
            state_bytes = connection.execute(
                sa.select(sa.func.sum(sa.func.length(entity_states.c.state)))).scalar()
        engine.dispose()
    rate = {name: rows / seconds for name, (rows, seconds) in results.items()}
    print("\n| monitor | rows | seconds | rows/s | ratio |\n|---|---:|---:|---:|---:|")
    for name, (rows, seconds) in results.items():
        print(f"| {name} | {rows:,} | {seconds:.1f} | {rate[name]:,.0f} | "
              f"{rate[name] / rate['rows']:.2f} |")
    per_entity = state_bytes / max(n_entities, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nentity states: {n_entities:,} entities, {per_entity:,.0f} bytes each "
          f"(10,000 entities: {per_entity * 10_000 / 2**20:.1f} MiB); peak RSS {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
