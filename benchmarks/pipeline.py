"""Pipeline benchmark: catching up a backlog with ``run --once`` against a plain-driver read.

For each database (a SQLite file, and a PostgreSQL server this script starts), it
loads N rows of an integer id, a timestamp and 32 float features (about 1%
anomalies) after a trained model's cursor, then measures in the same run:

1. the engine's own scan rate and the plain-driver read (sqlite3 / psycopg's default
   cursor, pages of 50,000 by id, converted to a float32 numpy array);
2. ``anomaly-monitor run --once`` catching up the whole backlog, rows/s excluding the
   process start-up (measured separately, with nothing to do);
3. the catch-up process's peak resident memory;
4. steady-state latency from a row's insert to its flag being committed (p50/p99).

    python -m benchmarks.pipeline [--rows 1000000] [--databases sqlite postgresql]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 32
PAGE_ROWS = 50_000
TRAINING_ROWS = 50_000
TRAINING_EPOCHS = 5
ANOMALY_RATE = 0.01
LOAD_CHUNK_ROWS = 50_000
INTERVAL_SECONDS = 1.0
LATENCY_SECONDS = 20.0
LATENCY_ROWS_PER_SECOND = 200
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
RESULTS = Path(__file__).parent / "results" / "pipeline.md"
#: Two monitors on the same table, with their own cursors: one catches up through the
#: default (Arrow) read path, the other with ``run --reader plain``.
MONITORS = ("bench", "bench_plain")


def make_rows(n: int, seed: int) -> np.ndarray:
    """``n`` rows of correlated features; about 1% break the correlations."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(0).normal(size=(4, N_FEATURES))
    x = rng.normal(size=(n, 4)) @ mixing + 0.1 * rng.normal(size=(n, N_FEATURES))
    bad = rng.random(n) < ANOMALY_RATE
    x[bad] = rng.normal(size=(int(bad.sum()), N_FEATURES)) * 3
    return x


@dataclass
class Database:
    """One database under test: a SQLAlchemy URL and a plain-driver connector."""

    name: str
    url: str
    plain: Any
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def databases(names: list[str], workdir: Path) -> Iterator[list[Database]]:
    """The requested databases, created empty (PostgreSQL: a server started here)."""
    found = []
    with contextlib.ExitStack() as stack:
        if "sqlite" in names:
            path = workdir / "bench.db"
            found.append(Database("sqlite", f"sqlite:///{path}",
                                  lambda path=path: sqlite3.connect(path)))
        if "postgresql" in names:
            from tests.pgserver import running_server

            server = stack.enter_context(running_server())
            name = server.create_database(template=None)
            found.append(Database("postgresql", server.url(name),
                                  lambda server=server, name=name: server.connect(name),
                                  {"server": server}))
        yield found


def create_table(db: Database) -> None:
    """The source table ``readings``."""
    serial = "INTEGER PRIMARY KEY" if db.name == "sqlite" else "BIGSERIAL PRIMARY KEY"
    real = "REAL" if db.name == "sqlite" else "DOUBLE PRECISION"
    ts = "TIMESTAMP" if db.name == "sqlite" else "TIMESTAMPTZ"
    columns = ", ".join(f"{f} {real}" for f in FEATURES)
    with contextlib.closing(db.plain()) as conn:
        conn.execute(f"CREATE TABLE readings (id {serial}, ts {ts} NOT NULL, {columns})")
        conn.commit()


def load(db: Database, x: np.ndarray, start: dt.datetime) -> None:
    """Append rows ``x`` with timestamps one second apart from ``start``."""
    stamps = [start + dt.timedelta(seconds=i) for i in range(len(x))]
    names = ", ".join(["ts", *FEATURES])
    with contextlib.closing(db.plain()) as conn:
        for lo in range(0, len(x), LOAD_CHUNK_ROWS):
            chunk = x[lo:lo + LOAD_CHUNK_ROWS]
            rows = [(stamps[lo + i].strftime("%Y-%m-%d %H:%M:%S.%f+00:00"), *map(float, r))
                    for i, r in enumerate(chunk)]
            if db.name == "sqlite":
                marks = ", ".join("?" * (N_FEATURES + 1))
                conn.executemany(f"INSERT INTO readings ({names}) VALUES ({marks})", rows)
            else:
                with conn.cursor().copy(f"COPY readings ({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        conn.commit()


def plain_read(db: Database, after: int) -> tuple[int, float]:
    """Rows and seconds of the obvious read: pages by id, tuples to float32 numpy."""
    columns = ", ".join(FEATURES)
    mark = "?" if db.name == "sqlite" else "%s"
    rows = 0
    start = time.perf_counter()
    with contextlib.closing(db.plain()) as conn:
        cursor = conn.cursor()
        while True:
            cursor.execute(f"SELECT id, ts, {columns} FROM readings WHERE id > {mark} "
                           f"ORDER BY id LIMIT {PAGE_ROWS}", (after,))
            page = cursor.fetchall()
            if not page:
                break
            matrix = np.array([r[2:] for r in page], dtype=np.float32)
            rows += len(matrix)
            after = page[-1][0]
    return rows, time.perf_counter() - start


def engine_scan(db: Database, after: int) -> float:
    """Seconds for the engine alone to scan the backlog (no transfer to Python)."""
    total = " + ".join(FEATURES)
    start = time.perf_counter()
    with contextlib.closing(db.plain()) as conn:
        if db.name == "sqlite":
            cursor = conn.cursor()
            lo = after
            while True:
                cursor.execute(f"SELECT max(id), sum({total}) FROM (SELECT * FROM readings "
                               f"WHERE id > ? ORDER BY id LIMIT {PAGE_ROWS})", (lo,))
                top = cursor.fetchone()[0]
                if top is None:
                    break
                lo = top
        else:
            conn.execute(f"COPY (SELECT id, ts, {', '.join(FEATURES)} FROM readings WHERE "
                         f"id > {int(after)} ORDER BY id) TO '/dev/null' (FORMAT binary)")
    return time.perf_counter() - start


def write_config(db: Database, path: Path, batch_size: int) -> Path:
    """A config for the benchmark's monitor."""
    features = ", ".join(f'"{f}"' for f in FEATURES)
    monitors = "".join(
        f'[[monitor]]\nname = "{name}"\ntable = "readings"\ntimestamp_column = "ts"\n'
        f"features = [{features}]\nkind = \"dae\"\ninterval_seconds = {INTERVAL_SECONDS}\n"
        f"batch_size = {batch_size}\n\n[monitor.model]\nepochs = {TRAINING_EPOCHS}\n"
        "n_estimators = 1\n\n" for name in MONITORS)
    path.write_text(f'[database]\nurl = "{db.url}"\n\n[metrics]\nport = 0\n\n{monitors}')
    return path


def cli(config: Path, *args: str) -> list[str]:
    """The command line for ``anomaly-monitor --config CONFIG ARGS``."""
    return [sys.executable, "-m", "anomaly_monitor", "--config", str(config), *args]


def timed_process(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, the process and its children) of ``command``."""
    import psutil

    # The log goes to a file: a pipe nobody reads until the end would fill up and
    # block the process (a 10M-row catch-up logs a line per batch).
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        peak = 0
        while process.poll() is None:
            with contextlib.suppress(psutil.Error):
                rss = process.memory_info().rss + sum(
                    c.memory_info().rss for c in process.children(recursive=True))
                peak = max(peak, rss)
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        log.seek(0)
        output = log.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {output[-4000:]}")
    return seconds, peak / 2**20


def latency(db: Database, config: Path, seed: int) -> tuple[float, float, int]:
    """p50 and p99 seconds from insert to committed flag while the daemon runs."""
    import sqlalchemy as sa

    from anomaly_monitor.db import create_engine

    engine = create_engine(db.url)
    daemon = subprocess.Popen(cli(config, "run", "-m", "bench"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    inserted: dict[int, float] = {}
    flagged: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        seen = 0
        while not stop.is_set():
            with engine.connect() as conn:
                rows = conn.execute(sa.text(
                    "SELECT source_id FROM am_anomalies WHERE id > :seen AND monitor = 'bench' "
                    "ORDER BY id"),
                    {"seen": seen}).all()
                top = conn.execute(sa.text("SELECT max(id) FROM am_anomalies")).scalar()
            now = time.perf_counter()
            for (source_id,) in rows:
                flagged.setdefault(source_id, now)
            seen = top or seen
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    time.sleep(4)  # let the daemon start and catch up
    watcher.start()
    rng = np.random.default_rng(seed)
    end = time.perf_counter() + LATENCY_SECONDS
    with contextlib.closing(db.plain()) as conn:
        mark = "?" if db.name == "sqlite" else "%s"
        names = ", ".join(["ts", *FEATURES])
        marks = ", ".join([mark] * (N_FEATURES + 1))
        while time.perf_counter() < end:
            row = rng.normal(size=N_FEATURES) * 4  # clearly anomalous: every row is flagged
            cursor = conn.cursor()
            cursor.execute(f"INSERT INTO readings ({names}) VALUES ({marks}) RETURNING id",
                           (dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00:00"),
                            *map(float, row)))
            (new_id,) = cursor.fetchone()
            conn.commit()
            inserted[new_id] = time.perf_counter()
            time.sleep(1 / LATENCY_ROWS_PER_SECOND)
    time.sleep(INTERVAL_SECONDS * 2 + 1)
    stop.set()
    watcher.join()
    daemon.terminate()
    daemon.wait(timeout=30)
    engine.dispose()
    delays = np.array([flagged[i] - t for i, t in inserted.items() if i in flagged])
    if delays.size == 0:
        return float("nan"), float("nan"), 0
    return float(np.quantile(delays, 0.5)), float(np.quantile(delays, 0.99)), len(delays)


def train(db: Database, config: Path) -> None:
    """Migrate, and train + activate a model on the first rows."""
    for args in (("db", "upgrade"), *(("train", name, "--device", "cpu") for name in MONITORS)):
        subprocess.run(cli(config, *args), check=True, capture_output=True)


def measure(db: Database, rows: int, workdir: Path, batch_size: int) -> dict[str, Any]:
    """All the figures for one database."""
    create_table(db)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=TRAINING_ROWS + rows + 3600)
    load(db, make_rows(TRAINING_ROWS, seed=1), start)
    config = write_config(db, workdir / f"{db.name}.toml", batch_size)
    train(db, config)
    load(db, make_rows(rows, seed=2), start + dt.timedelta(seconds=TRAINING_ROWS))
    read_rows, read_seconds = plain_read(db, TRAINING_ROWS)
    scan_seconds = engine_scan(db, TRAINING_ROWS)
    catchup_seconds, peak_mb = timed_process(cli(config, "run", "--once", "-m", "bench"))
    plain_seconds, _ = timed_process(cli(config, "run", "--once", "-m", "bench_plain",
                                         "--reader", "plain"))
    startup_seconds, _ = timed_process(cli(config, "run", "--once", "-m", "bench"))
    p50, p99, flagged = latency(db, config, seed=3)
    catchup_rate = rows / max(catchup_seconds - startup_seconds, 1e-9)
    plain_catchup_rate = rows / max(plain_seconds - startup_seconds, 1e-9)
    return {
        "database": db.name, "rows": rows, "read_rows": read_rows,
        "scan_rate": rows / scan_seconds, "plain_rate": read_rows / read_seconds,
        "catchup_rate": catchup_rate, "ratio": catchup_rate / (read_rows / read_seconds),
        "plain_catchup_rate": plain_catchup_rate, "arrow_gain": catchup_rate / plain_catchup_rate,
        "of_scan": catchup_rate / (rows / scan_seconds), "startup": startup_seconds,
        "peak_mb": peak_mb, "p50": p50, "p99": p99, "latency_rows": flagged,
    }


def render(results: list[dict[str, Any]], batch_size: int) -> str:
    """A markdown table of the results."""
    lines = [
        f"Backlog of {results[0]['rows']:,} rows x {N_FEATURES} float features; pages of "
        f"{PAGE_ROWS:,} for the plain read; batch_size {batch_size:,}; "
        f"interval {INTERVAL_SECONDS:g} s.", "",
        "| database | engine scan rows/s | plain read rows/s | run --once rows/s "
        "| ratio to plain | of engine scan | run --once --reader plain rows/s | Arrow vs plain "
        "| start-up s | peak RSS MB | latency p50 s | latency p99 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['database']} | {r['scan_rate']:,.0f} | {r['plain_rate']:,.0f} "
            f"| {r['catchup_rate']:,.0f} | {r['ratio']:.2f}x | {r['of_scan']:.0%} "
            f"| {r['plain_catchup_rate']:,.0f} | {r['arrow_gain']:.2f}x "
            f"| {r['startup']:.2f} | {r['peak_mb']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print (and by default write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--output", type=Path, default=None,
                        help=f"Markdown file (default {RESULTS} for a default run).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="am-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        with databases(args.databases, workdir) as dbs:
            results = [measure(db, args.rows, workdir, args.batch_size) for db in dbs]
    table = render(results, args.batch_size)
    print(table)
    output = args.output or (RESULTS if args.rows == 1_000_000 else None)
    if output is not None:
        command = " ".join(["python -m benchmarks.pipeline", *(argv if argv is not None
                                                                else sys.argv[1:])])
        output.write_text(f"# Pipeline benchmark (`{command}`)\n\n{table}")


if __name__ == "__main__":
    main()
