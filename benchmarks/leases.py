"""Lease recovery: how long a monitor goes unscored after its leader stops, per cause.

For each database (a SQLite file, and a PostgreSQL server this script starts) a
real leader process holds the monitor's lease; it is then stopped cleanly
(SIGTERM), killed (SIGKILL) on this host, or killed while pretending to run on
another host (only the database can tell it is gone). A successor worker polls
every 0.1 s; the figure is the time from the leader's end to the successor's
first committed batch, beside ``lease_seconds`` (the old bound for every case).

    python -m benchmarks.leases [--databases sqlite postgresql] [--output FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlalchemy as sa

if TYPE_CHECKING:
    from anomaly_monitor.config import MonitorSettings

LEASE_SECONDS = 30.0
INTERVAL_SECONDS = 3.0
POLL_SECONDS = 0.1
FEATURES = [f"f{i}" for i in range(6)]
RESULTS = Path(__file__).parent / "results" / "leases.md"

#: A leader: claims the lease with this package, holds a session, waits for a signal.
LEADER = """
import signal, sys, time
from anomaly_monitor.cursors import claim, release
from anomaly_monitor.db import create_engine
from anomaly_monitor.identity import worker_identity
url, seconds, host = sys.argv[1], float(sys.argv[2]), sys.argv[3]
owner = worker_identity()
if host:
    owner = host + owner[owner.index(":"):]
engine = create_engine(url)
with engine.begin() as connection:
    lease = claim(connection, "bench", owner, seconds).lease
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
renewed = time.monotonic()
with engine.connect():
    print(owner, flush=True)
    while not stop:  # renews a third of the lease after the last renewal, like a worker
        if time.monotonic() - renewed >= seconds / 3:
            with engine.begin() as connection:
                claim(connection, "bench", owner, seconds, lease)
            renewed = time.monotonic()
        time.sleep(0.05)
with engine.begin() as connection:  # a clean stop releases the lease
    release(connection, lease)
print("released", flush=True)
"""

CASES = (
    ("clean stop (SIGTERM)", signal.SIGTERM, ""),
    ("kill -9, this host", signal.SIGKILL, ""),
    ("kill -9, another host", signal.SIGKILL, "elsewhere.example"),
)


@contextlib.contextmanager
def database(name: str, workdir: Path) -> Iterator[str]:
    """A migrated database's URL (PostgreSQL: a server started here)."""
    from anomaly_monitor import migrate
    from anomaly_monitor.db import create_engine

    with contextlib.ExitStack() as stack:
        if name == "sqlite":
            url = f"sqlite:///{workdir / 'leases.db'}"
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.pgserver import running_server

            server = stack.enter_context(running_server())
            url = server.url(server.create_database(template=None))
        engine = create_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


def prepare(url: str) -> tuple[sa.Engine, sa.Table, MonitorSettings]:
    """A source table with history and a trained model; the engine, table and monitor."""
    from anomaly_monitor.config import MonitorSettings, ThresholdSettings
    from anomaly_monitor.db import create_engine
    from anomaly_monitor.lifecycle import train_monitor

    engine = create_engine(url)
    metadata = sa.MetaData()
    table = sa.Table("readings", metadata,
                     sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                     sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
                     *(sa.Column(f, sa.Float) for f in FEATURES))
    metadata.create_all(engine)
    insert(engine, table, 600)
    monitor = MonitorSettings(
        name="bench", table="readings", timestamp_column="ts", features=tuple(FEATURES),
        kind="dae", interval_seconds=INTERVAL_SECONDS, lease_seconds=LEASE_SECONDS,
        threshold=ThresholdSettings(method="quantile", target_fpr=0.01),
        model={"n_estimators": 1, "epochs": 10})
    train_monitor(engine, monitor, device="cpu")
    return engine, table, monitor


def insert(engine: sa.Engine, table: sa.Table, n: int) -> None:
    rng = np.random.default_rng(n)
    now = dt.datetime.now(dt.UTC)
    rows = [{"ts": now, **{f: float(v) for f, v in zip(FEATURES, row, strict=True)}}
            for row in rng.normal(size=(n, len(FEATURES)))]
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)


def recovery_seconds(url: str, engine: sa.Engine, table: sa.Table, monitor: MonitorSettings,
                     sig: signal.Signals, host: str) -> float:
    """Seconds from the leader's end to a successor's first committed batch."""
    from prometheus_client import CollectorRegistry

    from anomaly_monitor.config import Settings
    from anomaly_monitor.metrics import Metrics
    from anomaly_monitor.worker import Worker

    leader = subprocess.Popen([sys.executable, "-c", LEADER, url, str(LEASE_SECONDS), host],
                              stdout=subprocess.PIPE, text=True)
    assert leader.stdout is not None
    leader.stdout.readline()
    successor = Worker(Settings(path=None, database_url=url, metrics_port=0, monitors=(monitor,)),
                       engine, Metrics(CollectorRegistry()), device="cpu")
    successor.preload_models()
    assert successor.poll("bench").status == "standby"
    insert(engine, table, 20)
    time.sleep(LEASE_SECONDS / 4)  # the leader is mid-way between two renewals
    leader.send_signal(sig)
    leader.wait(timeout=30)
    ended = time.monotonic()
    while successor.poll("bench").status != "running" or successor.states["bench"].rows == 0:
        if time.monotonic() - ended > 2 * LEASE_SECONDS:
            raise RuntimeError("the successor never took over")
        time.sleep(POLL_SECONDS)
    seconds = time.monotonic() - ended
    successor.release_leases()
    return seconds


def main(argv: list[str] | None = None) -> None:
    """Measure every case on every database and print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    lines = [f"Lease {LEASE_SECONDS:g} s, interval {INTERVAL_SECONDS:g} s; the successor polls "
             f"every {POLL_SECONDS:g} s. Seconds from the leader's end to the successor's "
             "first committed batch (ratio to the lease).", "",
             "| database | " + " | ".join(name for name, _, _ in CASES) + " |",
             "|---|" + "---:|" * len(CASES)]
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.databases:
            with database(name, Path(workdir)) as url:
                engine, table, monitor = prepare(url)
                cells = []
                for _, sig, host in CASES:
                    seconds = recovery_seconds(url, engine, table, monitor, sig, host)
                    cells.append(f"{seconds:.1f} ({seconds / LEASE_SECONDS:.2f}x)")
                engine.dispose()
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "# Lease recovery (python -m benchmarks.leases)\n\n" + "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
