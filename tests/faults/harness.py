"""Shared pieces of the fault tests: a resilient producer, the daemon as a subprocess,
and the exactly-once oracle."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.cursors import read_cursor
from anomaly_monitor.entities import row_entities
from anomaly_monitor.incidents import incident_gap
from anomaly_monitor.reading.windows import read_window
from anomaly_monitor.registry import load_model
from anomaly_monitor.source import reflect_source
from anomaly_monitor.tables import anomalies, batches, quarantine
from anomaly_monitor.windows import (
    EntityState,
    build_inputs,
    calibrate_scores,
    model_term,
    score_terms,
)
from tests.helpers import FEATURES, Sensors, incident_errors, wait_for

CONFIG = """
[database]
url = "{url}"

[metrics]
port = 0

[[monitor]]
name = "plant"
table = "readings"
timestamp_column = "ts"
features = [{features}]
kind = "dae"
interval_seconds = {interval}
batch_size = {batch_size}
lease_seconds = {lease}
"""


def write_config(path: Path, url: str, *, interval: float = 0.2, batch_size: int = 40,
                 lease: float = 1.5) -> Path:
    """A config for the daemon under test."""
    path.write_text(CONFIG.format(url=url, interval=interval, batch_size=batch_size, lease=lease,
                                  features=", ".join(f'"{f}"' for f in FEATURES)))
    return path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``anomaly-monitor run`` in a subprocess, logging to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "anomaly_monitor", "--config", str(config), "run"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


class Producer(threading.Thread):
    """Inserts seeded rows (5% anomalous, 1% with a NULL) until stopped, riding out
    database outages."""

    def __init__(self, engine: sa.Engine, table: sa.Table, period: float = 0.01,
                 seed: int = 11, hold: float = 0.0) -> None:
        super().__init__(name="producer", daemon=True)
        self.engine, self.table, self.period, self.hold = engine, table, period, hold
        self.sensors = Sensors(seed)
        self.stop_event = threading.Event()
        self.inserted = 0
        self.errors = 0

    def _row(self) -> dict:
        draw = self.sensors.rng.random()
        values = (self.sensors.anomalous(1) if draw < 0.05 else self.sensors.normal(1))[0]
        row = {"ts": dt.datetime.now(dt.UTC), "label": int(draw < 0.05),
               **{f: float(v) for f, v in zip(FEATURES, values, strict=True)}}
        if draw > 0.99:
            row[FEATURES[int(self.sensors.rng.integers(len(FEATURES)))]] = None
        return row

    def run(self) -> None:
        """Insert one row per period."""
        while not self.stop_event.wait(self.period):
            try:
                with self.engine.begin() as connection:
                    connection.execute(self.table.insert().values(**self._row()))
                    if self.hold:  # commit late: ids then commit out of order
                        time.sleep(float(self.sensors.rng.uniform(0, self.hold)))
                self.inserted += 1
            except sa.exc.SQLAlchemyError:
                self.errors += 1
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop inserting and wait for the thread."""
        self.stop_event.set()
        self.join(timeout=30)


def kill_repeatedly(engine: sa.Engine, config: Path, log: Path, kills: int,
                    rng: np.random.Generator) -> int:
    """Start the daemon ``kills`` times and kill -9 it each time once it has committed
    a batch, a seeded moment later (mid-read, mid-score or mid-commit); the kills done."""
    done = 0
    for _ in range(kills):
        before = batch_count(engine)
        daemon = start_daemon(config, log)
        try:
            wait_for(lambda before=before: batch_count(engine) > before, timeout=60)
            time.sleep(float(rng.uniform(0.0, 0.4)))
        finally:
            daemon.kill()
            daemon.wait(timeout=30)
        done += 1
    return done


def batch_count(engine: sa.Engine) -> int:
    """Committed batches so far (0 when the database is unreachable)."""
    try:
        with engine.connect() as connection:
            return int(connection.execute(
                sa.select(sa.func.count()).select_from(batches)).scalar() or 0)
    except sa.exc.SQLAlchemyError:
        return 0


@dataclass
class Verdict:
    """What the oracle found."""

    rows: int
    flagged: int
    quarantined: int
    batches: int
    duplicates: int
    lost: list[int]
    extra: list[int]
    wrong_flags: list[int]
    #: What in am_incidents differs from the runs of the flags (tests.helpers.incident_errors).
    incident_errors: list[str] = field(default_factory=list)


def _pass_scores(connection: sa.Connection, source, model, window,
                 states: dict[str, EntityState] | None) -> np.ndarray:
    """One uninterrupted pass's scores: a window monitor's rows in id order from
    ``states`` (those training left), a row monitor's each on its own."""
    if model.window is None:
        return model.detector.decision_function(window.values)
    keys, _ = row_entities(connection, source, window.ids)
    built = build_inputs(window.values, keys, states or {}, model.window)
    terms = score_terms(model_term(model.detector, built.inputs, model.window), built)
    return calibrate_scores(terms, built, model.window)[0]


def _covered(every: np.ndarray, span) -> np.ndarray:
    """Which of ``every`` a batch covers: its id range minus the gaps it did not score."""
    inside = (every >= span.first_id) & (every <= span.last_id)
    for a, b in span.gaps or []:
        inside &= ~((every >= a) & (every <= b))
    return inside


def check_exactly_once(engine: sa.Engine, monitor: MonitorSettings, start: int,
                       states: dict[str, EntityState] | None = None) -> Verdict:
    """Compare the am_ tables with one uninterrupted pass over the rows, each row scored
    by the version its batch records (a window monitor's by version 1, from the entity
    ``states`` training left); every flag must record that version."""
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
        window = read_window(connection, source, start, 10**9)
        cursor = read_cursor(connection, monitor.name)
        spans = connection.execute(sa.select(batches.c.first_id, batches.c.last_id,
                                             batches.c.rows, batches.c.kind, batches.c.gaps,
                                             batches.c.model_version)
                                   .where(batches.c.monitor == monitor.name)
                                   .order_by(batches.c.first_id)).all()
        version_of = np.ones(len(window.ids), dtype=int)
        for span in spans:
            version_of[_covered(window.ids, span)] = span.model_version
        models = {v: load_model(connection, monitor.name, int(v), device="cpu")
                  for v in {1, *version_of.tolist()}}
        scores = np.zeros(len(window.ids))
        thresholds = np.zeros(len(window.ids))
        for v, model in models.items():
            mine = version_of == v
            if mine.any():
                scores[mine] = _pass_scores(connection, source, model, window,
                                            states)[mine]
                thresholds[mine] = model.version.threshold
        model = models[1]
        flags = connection.execute(sa.select(anomalies.c.source_id,
                                             anomalies.c.model_version)).all()
        flagged = [f.source_id for f in flags]
        quarantined = connection.execute(sa.select(quarantine.c.source_id)).scalars().all()
    assert cursor is not None and cursor.position == window.last_id, "not caught up"
    recorded = dict(zip(window.ids.tolist(), version_of.tolist(), strict=True))
    misversioned = sorted(f.source_id for f in flags
                          if recorded.get(f.source_id, f.model_version) != f.model_version)
    threshold = thresholds
    near = np.abs(scores - threshold) <= 1e-5 * np.maximum(np.abs(threshold), 1.0)
    expected = set(window.ids[(scores > threshold) & ~near].tolist())
    borderline = set(window.ids[near].tolist())
    actual = set(flagged)
    windows = [s for s in spans if s.kind == "window"]
    overlaps = sum(1 for a, b in itertools.pairwise(windows) if b.first_id <= a.last_id)
    every = np.array(sorted(set(window.ids.tolist()) | {b.source_id for b in window.bad}))
    coverage = np.zeros(len(every), dtype=int)
    for span in spans:
        coverage += _covered(every, span)
    counted = sum(s.rows for s in spans)
    return Verdict(
        rows=len(every), flagged=len(actual), quarantined=len(quarantined),
        batches=len(spans),
        duplicates=(len(flagged) - len(actual)) + (len(quarantined) - len(set(quarantined)))
        + overlaps + int((coverage > 1).sum()) + abs(counted - len(every)),
        lost=every[coverage == 0].tolist(),
        extra=sorted(set(quarantined) - {b.source_id for b in window.bad}),
        wrong_flags=sorted(((actual ^ expected) - borderline) | set(misversioned)),
        incident_errors=incident_errors(engine, monitor.name,
                                        incident_gap(monitor, model.version)),
    )
