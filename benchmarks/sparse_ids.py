"""Ids that step by 10 (a sequence shared with other tables) against dense ids, in one run.

Per database: the catch-up rate of a backlog (rows/s, ratio to dense ids), the open
id ranges it leaves, and what a sweep then costs once every batch is between 5 and 55
minutes old: every open range read as each poll did before (OR-ed BETWEEN ranges),
every batch read the new way (one id scan per batch), and a sweep as a poll now
does it (only the batches at a checkpoint of their age).

    python -m benchmarks.sparse_ids [--rows 100000] [--databases sqlite postgresql]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from benchmarks.leases import FEATURES, database, prepare

RESULTS = Path(__file__).with_name("results") / "sparse-ids.md"
STEP = 10


def _fill(engine: sa.Engine, table: sa.Table, n: int, step: int) -> None:
    rng = np.random.default_rng(7)
    with engine.connect() as connection:
        start = int(connection.execute(sa.select(sa.func.max(table.c.id))).scalar()) + 1000
    now = dt.datetime.now(dt.UTC)
    rows = [{"id": start + step * i, "ts": now,
             **{f: float(v) for f, v in zip(FEATURES, row, strict=True)}}
            for i, row in enumerate(rng.normal(size=(n, len(FEATURES))))]
    with engine.begin() as connection:
        for lo in range(0, n, 20_000):
            connection.execute(table.insert(), rows[lo:lo + 20_000])


def measure(url: str, rows: int, step: int) -> dict[str, float]:
    """Catch-up rows/s, open ranges, and the two sweeps' seconds for ids ``step`` apart."""
    from anomaly_monitor.batch import ReadState, run_batch, sweep_late_rows
    from anomaly_monitor.registry import ModelCache
    from anomaly_monitor.source import reflect_source
    from anomaly_monitor.tables import batches

    engine, table, monitor = prepare(url)
    _fill(engine, table, rows, step)
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    models, state = ModelCache("cpu"), ReadState()
    started = time.perf_counter()
    scored = 0
    while True:
        result = run_batch(engine, monitor, source, models, read_state=state)
        scored += result.rows
        if result.caught_up:
            break
    rate = scored / (time.perf_counter() - started)
    state.close()
    with engine.begin() as connection:
        ids = connection.execute(sa.select(batches.c.id).where(
            batches.c.open_gaps.is_not(None))).scalars().all()
        ranges = sum(len(g) for (g,) in connection.execute(
            sa.select(batches.c.open_gaps).where(batches.c.open_gaps.is_not(None))))
        now = dt.datetime.now(dt.UTC)
        for k, batch_id in enumerate(ids):  # spread the batches over 5..55 minutes of age
            age = 300 + 3000 * k / max(1, len(ids) - 1)
            connection.execute(batches.update().where(batches.c.id == batch_id)
                               .values(started_at=now - dt.timedelta(seconds=age)))
    seconds = {"or of ranges": _or_of_ranges(engine, source)}
    for name, since in (("every range", None), ("due only", now - dt.timedelta(seconds=5))):
        t0 = time.perf_counter()
        sweep_late_rows(engine, monitor, source, models, since=since, clock=lambda: now)
        seconds[name] = time.perf_counter() - t0
    engine.dispose()
    return {"rows_per_second": rate, "ranges": float(ranges), "batches": float(len(ids)),
            "sweep_or": seconds["or of ranges"], "sweep_all": seconds["every range"],
            "sweep_due": seconds["due only"]}


def _or_of_ranges(engine: sa.Engine, source: object) -> float:
    """Seconds to read every open range as the sweep did before: ``id BETWEEN a AND b``
    OR-ed, 200 ranges a query."""
    from anomaly_monitor.reading.query import select_rows
    from anomaly_monitor.tables import batches

    t0 = time.perf_counter()
    with engine.connect() as connection:
        ranges = [(int(a), int(b)) for (gaps,) in connection.execute(
            sa.select(batches.c.open_gaps).where(batches.c.open_gaps.is_not(None)))
            for a, b in gaps]
        column = source.id_column  # type: ignore[attr-defined]
        for lo in range(0, len(ranges), 200):
            within = sa.or_(*(column.between(a, b) for a, b in ranges[lo:lo + 200]))
            connection.execute(select_rows(source, source.features).where(within)).all()  # type: ignore[arg-type, attr-defined]
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    """Measure dense and sparse ids per database; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    lines = [f"Backlog of {args.rows:,} rows x {len(FEATURES)} features, batch_size 10,000; "
             f"sparse: ids {STEP} apart. Sweeps once the batches are 5-55 minutes old.", "",
             "| database | ids | catch-up rows/s | ratio to dense | open ranges | batches with "
             "open gaps | sweep before (OR of ranges) s | sweep, every batch s | sweep, due "
             "only (a poll now) s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.databases:
            dense = None
            for label, step in (("dense", 1), (f"step {STEP}", STEP)):
                folder = Path(workdir) / f"{name}-{step}"
                folder.mkdir()
                with database(name, folder) as url:
                    found = measure(url, args.rows, step)
                dense = dense or found["rows_per_second"]
                lines.append(
                    f"| {name} | {label} | {found['rows_per_second']:,.0f} | "
                    f"{found['rows_per_second'] / dense:.2f}x | {found['ranges']:,.0f} | "
                    f"{found['batches']:,.0f} | {found['sweep_or']:.3f} | "
                    f"{found['sweep_all']:.3f} | {found['sweep_due']:.3f} |")
    text = ("# Sparse ids (python -m benchmarks.sparse_ids)\n\n" + "\n".join(lines) + "\n")
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
