"""``anomaly-monitor demo``: the whole service on simulated plant telemetry, on SQLite.

Eight correlated sensors driven by a daily cycle and a slowly varying load, with
labelled injected anomalies of four kinds (spikes, drifts, stuck sensors, broken
correlations) and a few rows with missing values. The demo trains, calibrates,
runs the daemon while a producer inserts rows, and reports precision and recall.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from anomaly_monitor.config import DEFAULT_ALERT_SEVERITY
from anomaly_monitor.demo_hosts import (
    HOST_STEP_SECONDS,
    HOST_TABLE,
    Hosts,
    create_host_table,
)

SENSORS = ("temp_in", "temp_out", "pressure", "flow", "power", "vibration", "rpm", "humidity")
ANOMALY_KINDS = ("spike", "drift", "stuck", "broken_correlation")
DB_FILE = "anomaly-monitor-demo.db"
CONFIG_FILE = "anomaly-monitor-demo.toml"
#: Simulated seconds between rows of history.
HISTORY_STEP_SECONDS = 60
HISTORY_ROWS = 12_000
#: Live rows: the producer inserts this many per tick.
LIVE_ROWS_PER_TICK = 10
LIVE_TICK_SECONDS = 0.25
#: Live rows between the starts of two anomaly episodes (drawn uniformly).
EPISODE_GAP_ROWS = (100, 200)
MISSING_RATE = 0.003
DAEMON_INTERVAL_SECONDS = 2
#: Samples of history per host for the window monitor.
HOST_HISTORY_STEPS = 2000

CONFIG = """\
# Written by 'anomaly-monitor demo'.
[database]
url = "sqlite:///{db}"

[metrics]
host = "127.0.0.1"
port = {port}

[[monitor]]
name = "plant"
table = "readings"
id_column = "id"
timestamp_column = "ts"
features = [{features}]
label_column = "is_anomaly"
kind = "dae"
interval_seconds = {interval}
batch_size = 5000

[monitor.threshold]
method = "pot"
target_fpr = 0.002

[monitor.incidents]
# Live rows come 10 at a time every 0.25 s, but the history was a row a minute: the
# default gap (3 sampling intervals of the training rows) would be 3 minutes.
gap_seconds = 1

[monitor.model]
epochs = 40

# A metric stream: one row per host per 5 minutes, each host scored with its last
# 8 samples against its own baseline.
[[monitor]]
name = "hosts"
table = "host_metrics"
timestamp_column = "ts"
entity_column = "host"
features = ["cpu", "latency_ms"]
label_column = "is_anomaly"
kind = "dae"
interval_seconds = {interval}

[monitor.window]
size = 8
derived = ["diff", "spread"]

[monitor.threshold]
target_fpr = 0.005

[monitor.model]
epochs = 20
"""


class Plant:
    """A seeded simulator of correlated telemetry with injected anomalies."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.load = 0.0
        self.mixing = np.array([
            [1.0, 0.8, 0.3], [0.6, 1.0, -0.2], [0.9, 0.1, 0.7], [0.2, 0.9, 0.5],
            [1.2, 0.4, 0.6], [0.3, 0.2, 1.0], [0.8, 0.7, 0.1], [-0.5, 0.9, 0.2],
        ])
        self.offsets = np.array([60.0, 25.0, 3.0, 120.0, 450.0, 2.0, 1500.0, 45.0])
        self.scales = np.array([5.0, 4.0, 0.4, 15.0, 60.0, 0.3, 200.0, 6.0])
        self.episode: dict[str, Any] | None = None
        self.until_episode = int(self.rng.integers(*EPISODE_GAP_ROWS))
        self.last = np.zeros(len(SENSORS))
        #: The simulated clock's zero (the history's start), when set.
        self.origin: dt.datetime | None = None

    def normal(self, t: float) -> np.ndarray:
        """One normal reading at simulated time ``t`` (seconds)."""
        self.load = 0.98 * self.load + 0.2 * self.rng.standard_normal()
        day = 2 * np.pi * t / 86_400
        factors = np.array([np.sin(day), self.load, np.cos(day)])
        values = self.mixing @ factors + 0.1 * self.rng.standard_normal(len(SENSORS))
        return self.offsets + self.scales * values

    def _start_episode(self) -> None:
        kind = ANOMALY_KINDS[self.rng.integers(len(ANOMALY_KINDS))]
        length = {"spike": 1, "drift": 30, "stuck": 25, "broken_correlation": 20}[kind]
        sensor = int(self.rng.integers(len(SENSORS)))
        self.episode = {"kind": kind, "sensor": sensor, "left": length, "step": 0,
                        "stuck": self.last[sensor], "sign": self.rng.choice([-1.0, 1.0])}

    def reading(self, t: float, *, anomalies: bool) -> tuple[np.ndarray, str | None]:
        """A reading and its anomaly kind (``None`` when normal)."""
        values = self.normal(t)
        if anomalies and self.episode is None:
            self.until_episode -= 1
            if self.until_episode <= 0:
                self.until_episode = int(self.rng.integers(*EPISODE_GAP_ROWS))
                self._start_episode()
        kind = None
        if self.episode is not None:
            e, kind = self.episode, self.episode["kind"]
            s, scale = e["sensor"], self.scales[e["sensor"]]
            e["step"] += 1
            if kind == "spike":
                values[s] += e["sign"] * 8 * scale
            elif kind == "drift":
                values[s] += e["sign"] * (1.5 + 0.15 * e["step"]) * scale
            elif kind == "stuck":
                values[s] = e["stuck"] + 3 * scale * e["sign"]
            else:
                values[s] = self.offsets[s] + scale * (3 * e["sign"]
                                                       + 0.5 * self.rng.standard_normal())
            e["left"] -= 1
            if e["left"] == 0:
                self.episode = None
        self.last = values
        return values, kind


def _create_table(engine: sa.Engine) -> sa.Table:
    metadata = sa.MetaData()
    table = sa.Table(
        "readings", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        *(sa.Column(name, sa.Float) for name in SENSORS),
        sa.Column("is_anomaly", sa.Integer, nullable=False),
        sa.Column("anomaly_kind", sa.String(32)),
    )
    metadata.create_all(engine)
    return table


def _rows(plant: Plant, start: dt.datetime, count: int, step: float,
          anomalies: bool) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        ts = start + dt.timedelta(seconds=i * step)
        # Simulated time from the history's start: the same cycle whatever the hour.
        since = (ts - plant.origin).total_seconds() if plant.origin else ts.timestamp()
        values, kind = plant.reading(since, anomalies=anomalies)
        row: dict[str, Any] = {"ts": ts, "is_anomaly": int(kind is not None),
                               "anomaly_kind": kind}
        row.update({name: float(v) for name, v in zip(SENSORS, values, strict=True)})
        if anomalies and plant.rng.random() < MISSING_RATE:
            row[SENSORS[int(plant.rng.integers(len(SENSORS)))]] = None
        rows.append(row)
    return rows


@dataclass
class Producer:
    """Inserts live rows until stopped: plant readings and one sample of every host."""

    engine: sa.Engine
    table: sa.Table
    plant: Plant
    stop: threading.Event
    host_table: sa.Table | None = None
    hosts: Hosts | None = None
    #: The hosts' simulated time: a sample every HOST_STEP_SECONDS per tick, so that
    #: their daily cycles go on at the history's pace.
    host_clock: dt.datetime | None = None
    inserted: int = 0

    def __call__(self) -> None:
        """Insert ``LIVE_ROWS_PER_TICK`` rows (and a sample per host) every tick."""
        while not self.stop.wait(LIVE_TICK_SECONDS):
            now = dt.datetime.now(dt.UTC)
            rows = _rows(self.plant, now, LIVE_ROWS_PER_TICK, 0.0, True)
            with self.engine.begin() as connection:
                connection.execute(self.table.insert(), rows)
                if self.host_table is not None and self.hosts is not None:
                    clock = self.host_clock or now
                    connection.execute(self.host_table.insert(),
                                       self.hosts.rows(clock, 1, True, stamp=now))
                    self.host_clock = clock + dt.timedelta(seconds=HOST_STEP_SECONDS)
            self.inserted += len(rows)


def _summary(engine: sa.Engine, monitor: str, table: str, first_live_id: int
             ) -> dict[str, Any]:
    from anomaly_monitor.tables import anomalies, batches, incidents, quarantine

    source = sa.table(table, sa.column("id"), sa.column("is_anomaly"),
                      sa.column("anomaly_kind"))
    mine = anomalies.c.monitor == monitor
    with engine.connect() as connection:
        truth = dict(connection.execute(sa.select(source.c.id, source.c.is_anomaly)
                                        .where(source.c.id > first_live_id)).all())
        flagged = {r[0] for r in connection.execute(
            sa.select(anomalies.c.source_id).where(mine, anomalies.c.source_id > first_live_id))}
        scored = connection.execute(sa.select(sa.func.sum(batches.c.rows))
                                    .where(batches.c.monitor == monitor)).scalar() or 0
        quarantined = connection.execute(
            sa.select(sa.func.count()).select_from(quarantine)
            .where(quarantine.c.monitor == monitor)).scalar() or 0
        severities = connection.execute(sa.select(incidents.c.max_severity).where(
            incidents.c.monitor == monitor)).scalars().all()
        top = connection.execute(
            sa.select(anomalies.c.source_id, anomalies.c.severity, anomalies.c.score,
                      anomalies.c.contributions, source.c.anomaly_kind, anomalies.c.entity)
            .join_from(anomalies, source, source.c.id == anomalies.c.source_id).where(mine)
            .order_by(anomalies.c.severity.desc(), anomalies.c.score.desc()).limit(5)
        ).all()
    positives = {i for i, label in truth.items() if label}
    hits = len(flagged & positives)
    episodes = _episodes(engine, table, first_live_id, flagged) if table == HOST_TABLE else {}
    return {
        "episodes": episodes, "monitor": monitor, "scored": int(scored), "flagged": len(flagged),
        "quarantined": int(quarantined), "live_rows": len(truth),
        "incidents": len(severities),
        "alerts": sum(1 for v in severities if v >= DEFAULT_ALERT_SEVERITY),
        "live_anomalies": len(positives),
        "precision": hits / len(flagged) if flagged else 0.0,
        "recall": hits / len(positives) if positives else 0.0, "top": top,
    }


def _episodes(engine: sa.Engine, table: str, first_live_id: int, flagged: set[int]
              ) -> dict[str, tuple[int, int]]:
    """Per injected kind: (episodes with at least one flagged row, episodes). An episode
    is a run of one host's consecutive labelled samples."""
    source = sa.table(table, sa.column("id"), sa.column("host"), sa.column("is_anomaly"),
                      sa.column("anomaly_kind"))
    with engine.connect() as connection:
        rows = connection.execute(sa.select(source.c.id, source.c.host, source.c.is_anomaly,
                                            source.c.anomaly_kind)
                                  .where(source.c.id > first_live_id)
                                  .order_by(source.c.host, source.c.id)).all()
    found: dict[str, list[int]] = {}
    current: list[int] = []
    for i, row in enumerate(rows):
        if row.is_anomaly:
            current.append(row.id)
        ends = not row.is_anomaly or i + 1 == len(rows) or rows[i + 1].host != row.host \
            or rows[i + 1].anomaly_kind != row.anomaly_kind
        if current and ends:
            kind = rows[i - (0 if row.is_anomaly else 1)].anomaly_kind
            found.setdefault(kind, [0, 0])
            found[kind][0] += bool(flagged & set(current))
            found[kind][1] += 1
            current = []
    return {kind: (hit, total) for kind, (hit, total) in sorted(found.items())}


def _serve_metrics(registry: Any, port: int, echo: Callable[[str], None]) -> None:
    from anomaly_monitor.metrics import serve

    if port == 0:
        return
    try:
        serve(registry, "127.0.0.1", port)
        echo(f"   metrics: http://127.0.0.1:{port}/metrics")
    except OSError as exc:
        echo(f"   metrics: port {port} is busy ({exc.strerror}); continuing without them")


def _calibrate(engine: sa.Engine, monitor: Any, echo: Callable[[str], None]) -> None:
    """What ``calibrate --dry-run`` shows, then the configured threshold applied."""
    from anomaly_monitor.calibration_plan import apply_calibration, plan_calibration

    plan = plan_calibration(engine, monitor, monitor.threshold)
    echo(f"   calibration over {plan.holdout_scores.size:,} held-out rows "
         "(anomaly-monitor calibrate plant --dry-run):")
    for candidate in plan.candidates:
        if candidate.label.startswith(("pot", "quantile fpr=0.01")):
            echo(f"     {candidate.label:<20} threshold {candidate.threshold.value:8.4g}  "
                 f"flags {candidate.holdout_rate:.2%} of held-out rows")
    apply_calibration(engine, monitor, plan)
    echo(f"   applied: {plan.chosen.method} at a 0.2% false-positive rate, threshold "
         f"{plan.chosen.value:.4g}")


def run_demo(directory: Path, *, seconds: int = 60, metrics_port: int = 9108,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo in ``directory`` and return its summary figures."""
    from prometheus_client import CollectorRegistry

    from anomaly_monitor import migrate
    from anomaly_monitor.config import load_settings
    from anomaly_monitor.db import create_engine
    from anomaly_monitor.lifecycle import train_monitor
    from anomaly_monitor.metrics import Metrics
    from anomaly_monitor.worker import Worker

    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    db_path = (directory / DB_FILE).resolve()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    config_path = directory / CONFIG_FILE
    config_path.write_text(CONFIG.format(
        db=db_path.as_posix(), port=metrics_port, interval=DAEMON_INTERVAL_SECONDS,
        features=", ".join(f'"{s}"' for s in SENSORS)), encoding="utf-8")
    settings = load_settings(config_path)
    monitor = settings.monitor("plant")
    engine = create_engine(settings.database_url)
    echo(f"1. database {db_path} with a 'readings' table of {len(SENSORS)} sensors")
    migrate.upgrade(engine)
    table = _create_table(engine)
    plant = Plant()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=HISTORY_ROWS * HISTORY_STEP_SECONDS)
    plant.origin = start
    with engine.begin() as connection:
        connection.execute(table.insert(),
                           _rows(plant, start, HISTORY_ROWS, HISTORY_STEP_SECONDS, False))
    echo(f"2. training a {monitor.kind} on {HISTORY_ROWS:,} rows of history "
         f"(the newest 20% held out for calibration)...")
    report = train_monitor(engine, monitor, device="cpu")
    version = report.version
    echo(f"   version {version.version} trained in {report.seconds:.0f} s "
         f"({sum(version.training['epochs_run'])} epochs)")
    _calibrate(engine, monitor, echo)
    host_table, hosts = create_host_table(engine), Hosts()
    host_start = dt.datetime.now(dt.UTC) - dt.timedelta(
        seconds=HOST_HISTORY_STEPS * HOST_STEP_SECONDS)
    hosts.origin = host_start
    with engine.begin() as connection:
        connection.execute(host_table.insert(), hosts.rows(host_start, HOST_HISTORY_STEPS,
                                                           False))
    echo(f"   and a window monitor 'hosts' on {len(hosts.names)} hosts x "
         f"{HOST_HISTORY_STEPS:,} samples ({HOST_TABLE}, a baseline per host)...")
    host_report = train_monitor(engine, settings.monitor("hosts"), device="cpu")
    echo(f"   version {host_report.version.version} trained in {host_report.seconds:.0f} s, "
         f"{host_report.version.training['entities']} entities, threshold "
         f"{host_report.version.threshold:.3g} (each host's tail probability "
         f"{10 ** -host_report.version.threshold:.2%})")
    with engine.connect() as connection:
        first_live = int(connection.execute(sa.text("SELECT max(id) FROM readings")).scalar())
        first_host = int(connection.execute(sa.select(sa.func.max(host_table.c.id))).scalar())
    registry = CollectorRegistry()
    worker = Worker(settings, engine, Metrics(registry), device="cpu")
    echo(f"3. running the daemon for {seconds} s while a producer inserts "
         f"{LIVE_ROWS_PER_TICK / LIVE_TICK_SECONDS:.0f} rows/s with injected anomalies")
    _serve_metrics(registry, metrics_port, echo)
    stop = threading.Event()
    producer = Producer(engine, table, plant, stop, host_table, hosts,
                        host_clock=dt.datetime.now(dt.UTC))
    threads = [threading.Thread(target=producer, name="producer"),
               threading.Thread(target=worker.run_forever, kwargs={"install_signals": False},
                                name="daemon")]
    for thread in threads:
        thread.start()
    try:
        time.sleep(seconds)
    finally:
        stop.set()
        threads[0].join()
        worker.stop()
        threads[1].join()
    worker.stop_event.clear()
    worker.run_once()
    summary = _summary(engine, "plant", "readings", first_live)
    summary["hosts"] = _summary(engine, "hosts", HOST_TABLE, first_host)
    summary["seconds"] = time.perf_counter() - started
    _print_summary(summary, config_path, echo)
    engine.dispose()
    return summary


def _print_top(top: list[Any], echo: Callable[[str], None]) -> None:
    echo("   top anomalies:")
    for source_id, severity, score, contributions, kind, entity in top:
        features = ", ".join(f"{c['feature']} {c['share']:.0%}" for c in contributions)
        where = f" ({entity})" if entity else ""
        echo(f"     row {source_id}{where}: severity {severity:.0f}, score {score:.3g}, "
             f"injected: {kind or 'none'}; top features: {features}")


def _incidents(summary: dict[str, Any]) -> str:
    return (f"the flags form {summary['incidents']} incident(s); {summary['alerts']} reached "
            f"severity {DEFAULT_ALERT_SEVERITY:g} and raised an AnomalyMonitorIncident alert")


def _print_summary(summary: dict[str, Any], config_path: Path,
                   echo: Callable[[str], None]) -> None:
    echo(f"4. done in {summary['seconds']:.0f} s: {summary['scored']:,} live rows scored, "
         f"{summary['flagged']} flagged, {summary['quarantined']} quarantined "
         "(missing values)")
    echo(f"   {_incidents(summary)}")
    echo(f"   against the injected labels ({summary['live_anomalies']} anomalous rows): "
         f"precision {summary['precision']:.2f}, recall {summary['recall']:.2f}")
    _print_top(summary["top"], echo)
    hosts = summary["hosts"]
    echo(f"   hosts (window monitor, per-host baselines): {hosts['scored']:,} live rows "
         f"scored, {hosts['flagged']} flagged; against the injected labels "
         f"({hosts['live_anomalies']} anomalous rows): precision {hosts['precision']:.2f}, "
         f"recall {hosts['recall']:.2f}")
    echo(f"   {_incidents(hosts)}")
    if hosts["episodes"]:
        echo("   injected episodes caught (a flag on at least one of their rows): " + ", ".join(
            f"{kind} {hit}/{total}" for kind, (hit, total) in hosts["episodes"].items()))
    _print_top(hosts["top"], echo)
    config = f"--config {config_path}"
    echo("   look further:")
    for command in ("status", "anomalies plant --limit 10",
                    "anomalies hosts --entity web-01", "incidents hosts", "models list",
                    "calibrate plant --dry-run", "run"):
        echo(f"     anomaly-monitor {config} {command}")
