"""Test helpers: a source table of correlated sensor rows and monitor settings for it."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import itertools
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from anomaly_monitor.config import MonitorSettings, Settings, ThresholdSettings
from anomaly_monitor.source import SourceTable, reflect_source

if TYPE_CHECKING:
    from anomaly_monitor.lifecycle import TrainReport

FEATURES = ("f0", "f1", "f2", "f3", "f4", "f5")
#: Small, fast models for tests.
FAST_MODEL = {"n_estimators": 1, "epochs": 15, "patience": 5}


def source_table(engine: sa.Engine, name: str = "readings") -> sa.Table:
    """Create the source table: integer id, timestamp, six float features, a label."""
    metadata = sa.MetaData()
    table = sa.Table(
        name, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        *(sa.Column(f, sa.Float) for f in FEATURES),
        sa.Column("label", sa.Integer, nullable=False, server_default="0"),
        sa.Column("note", sa.String(20)),
    )
    metadata.create_all(engine)
    return table


class Sensors:
    """Seeded rows on a 2-D linear manifold; anomalies break the correlations."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.mixing = np.random.default_rng(123).normal(size=(2, len(FEATURES)))

    def normal(self, n: int) -> np.ndarray:
        """``n`` normal rows."""
        return (self.rng.normal(size=(n, 2)) @ self.mixing
                + 0.05 * self.rng.normal(size=(n, len(FEATURES))))

    def anomalous(self, n: int) -> np.ndarray:
        """``n`` rows whose features come from different normal rows and are shifted."""
        pool = self.normal(n * len(FEATURES))
        rows = np.stack([pool[self.rng.integers(0, len(pool), n), j]
                         for j in range(len(FEATURES))], axis=1)
        return rows + 3.0 * np.sign(rows)


def insert_rows(
    engine: sa.Engine, table: sa.Table, values: np.ndarray | Sequence[Sequence[Any]], *,
    start: dt.datetime | None = None, step_seconds: float = 60.0, label: int = 0,
) -> list[int]:
    """Insert rows of feature values; returns their ids in order."""
    start = start or dt.datetime.now(dt.UTC) - dt.timedelta(seconds=step_seconds * len(values))
    rows = [
        {"ts": start + dt.timedelta(seconds=i * step_seconds), "label": label,
         **{f: (None if v is None else float(v)) for f, v in zip(FEATURES, row, strict=True)}}
        for i, row in enumerate(values)
    ]
    ids = []
    with engine.begin() as connection:
        for row in rows:
            ids.append(int(connection.execute(table.insert().values(**row)).inserted_primary_key[0]))
    return ids


def bulk_insert(engine: sa.Engine, table: sa.Table, values: np.ndarray, **kwargs: Any) -> None:
    """Insert many rows at once (no ids returned)."""
    start = kwargs.get("start") or dt.datetime.now(dt.UTC) - dt.timedelta(hours=len(values) / 60)
    rows = [{"ts": start + dt.timedelta(minutes=i), "label": kwargs.get("label", 0),
             **{f: float(v) for f, v in zip(FEATURES, row, strict=True)}}
            for i, row in enumerate(values)]
    with engine.begin() as connection:
        connection.execute(table.insert(), rows)


def monitor_settings(**overrides: Any) -> MonitorSettings:
    """Settings of the test monitor ``plant`` on table ``readings``."""
    base: dict[str, Any] = {
        "name": "plant", "table": "readings", "timestamp_column": "ts",
        "features": FEATURES, "kind": "dae", "interval_seconds": 1.0, "batch_size": 500,
        "threshold": ThresholdSettings(method="quantile", target_fpr=0.01),
        "model": dict(FAST_MODEL),
    }
    base.update(overrides)
    return MonitorSettings(**base)


def settings(url: str, *monitors: MonitorSettings, port: int = 0) -> Settings:
    """Whole settings for ``url`` with the given monitors (default: ``plant``)."""
    return Settings(path=None, database_url=url, metrics_port=port,
                    monitors=monitors or (monitor_settings(),))


#: Fitted test models by (training rows, hyperparameters): each is trained once per run.
_FITTED: dict[tuple[str, str], Any] = {}


@contextlib.contextmanager
def _fit_once() -> Iterator[None]:
    """Within the block, ``AutoencoderDetector.fit`` on rows and hyperparameters seen
    before in this test run restores a copy of that fit instead of training again
    (training is deterministic, so the copy is what training would give)."""
    from anomaly_monitor.detectors.estimator import AutoencoderDetector

    original = AutoencoderDetector.fit

    def fit(self: AutoencoderDetector, X: Any, y: object = None) -> AutoencoderDetector:
        try:
            rows = np.ascontiguousarray(np.asarray(X, dtype=np.float64))
        except (TypeError, ValueError):  # let fit report bad rows its own way
            return original(self, X, y)
        key = (hashlib.sha256(rows.tobytes()).hexdigest() + repr(rows.shape),
               repr(sorted(self.get_params().items())) + repr(list(getattr(X, "columns", []))))
        if key not in _FITTED:
            _FITTED[key] = copy.deepcopy(original(self, X, y))
        self.__dict__.update(copy.deepcopy(_FITTED[key]).__dict__)
        return self

    AutoencoderDetector.fit = fit  # type: ignore[method-assign]
    try:
        yield
    finally:
        AutoencoderDetector.fit = original  # type: ignore[method-assign]


def trained_plant(
    engine: sa.Engine, monitor: MonitorSettings | None = None, *,
    sensors: Sensors | None = None, rows: int = 600,
) -> tuple[sa.Table, MonitorSettings, SourceTable, TrainReport]:
    """A source table with ``rows`` normal rows of history and a trained, active model."""
    from anomaly_monitor.lifecycle import train_monitor

    table = source_table(engine)
    bulk_insert(engine, table, (sensors or Sensors()).normal(rows))
    monitor = monitor or monitor_settings()
    with _fit_once():
        report = train_monitor(engine, monitor, device="cpu")
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    return table, monitor, source, report


def drain(engine: sa.Engine, monitor: MonitorSettings, models: Any = None) -> list[Any]:
    """Call run_batch until caught up; returns the committed results."""
    from anomaly_monitor.batch import run_batch
    from anomaly_monitor.registry import ModelCache

    models = models or ModelCache("cpu")
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    results = []
    while True:
        result = run_batch(engine, monitor, source, models)
        if result.status == "committed":
            results.append(result)
        if result.caught_up:
            return results


def rows_in_batches(engine: sa.Engine) -> int:
    """Rows recorded by all ``am_batches`` (scored plus quarantined, every kind)."""
    from anomaly_monitor.tables import batches

    with engine.connect() as connection:
        return int(connection.execute(
            sa.select(sa.func.coalesce(sa.func.sum(batches.c.rows), 0))).scalar())


def daemon_config(engine: sa.Engine, features: Sequence[str], interval: float) -> str:
    """A config for the daemon as a subprocess: monitor ``plant`` on ``engine``'s
    ``readings``, no metrics port."""
    return (f'[database]\nurl = "{engine.url.render_as_string(hide_password=False)}"\n'
            '[metrics]\nport = 0\n'
            '[[monitor]]\nname = "plant"\ntable = "readings"\ntimestamp_column = "ts"\n'
            f'interval_seconds = {interval}\n'
            + 'features = [' + ", ".join(f'"{f}"' for f in features) + ']\n')


def wait_for(predicate, timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``predicate()`` holds; AssertionError after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


def scrape(registry: CollectorRegistry) -> str:
    """``registry`` served by the exporter and fetched over HTTP, as text."""
    from anomaly_monitor.metrics import serve
    from tests.pgserver import free_port

    port = free_port()
    server, thread = serve(registry, "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=5)


def pause_info(registry: CollectorRegistry, monitor: str) -> list[dict[str, str]]:
    """The labels of the monitor's pause_info series (set to 1)."""
    return [sample.labels for metric in registry.collect()
            if metric.name == "anomaly_monitor_pause_info" for sample in metric.samples
            if sample.labels["monitor"] == monitor and sample.value == 1]


def incident_errors(engine: sa.Engine, monitor: str, gap_seconds: float) -> list[str]:
    """The incidents oracle: what in ``am_incidents`` differs from the runs of each
    entity's flags (``am_anomalies``, suppressed ones left out) with at most
    ``gap_seconds`` between two, and from the open/closed rule at the newest source
    time scored. Empty when they agree: no incident split, duplicated or lost, whatever
    the order of scoring and crashes."""
    from collections import defaultdict

    from anomaly_monitor.tables import anomalies, as_utc, batches, cursors, incidents

    gap = dt.timedelta(seconds=gap_seconds)
    with engine.connect() as connection:
        flags = connection.execute(
            sa.select(anomalies.c.source_id, anomalies.c.entity, anomalies.c.generation,
                      anomalies.c.source_timestamp, anomalies.c.severity,
                      anomalies.c.incident_id).where(
                anomalies.c.monitor == monitor,
                anomalies.c.suppressed_by.is_(None))).all()  # suppressed: no incident
        stored = {r.id: r for r in connection.execute(
            sa.select(incidents).where(incidents.c.monitor == monitor))}
        newest = [as_utc(t) for t in connection.execute(
            sa.select(batches.c.newest_timestamp).where(batches.c.monitor == monitor)
        ).scalars() if t is not None]
        at_cursor = as_utc(connection.execute(sa.select(cursors.c.position_timestamp).where(
            cursors.c.monitor == monitor)).scalar())
    errors = [f"flag {f.source_id} has no incident" for f in flags if f.incident_id is None]
    flags = [f for f in flags if f.source_timestamp is not None]  # not grouped by time
    runs: dict[tuple[int, str | None], list[Any]] = defaultdict(list)
    for f in sorted(flags, key=lambda f: (as_utc(f.source_timestamp), f.source_id)):
        runs[(f.generation, f.entity)].append(f)
    expected = set()
    for group in runs.values():
        run = [group[0].source_id]
        for a, b in itertools.pairwise(group):
            if as_utc(b.source_timestamp) - as_utc(a.source_timestamp) > gap:
                expected.add(frozenset(run))
                run = []
            run.append(b.source_id)
        expected.add(frozenset(run))
    members: dict[int, list[Any]] = defaultdict(list)
    for f in flags:
        members[f.incident_id].append(f)
    actual = {frozenset(f.source_id for f in group) for group in members.values()}
    errors += [f"expected one incident of flags {sorted(s)}" for s in expected - actual]
    errors += [f"incident of flags {sorted(s)} is not a run" for s in actual - expected]
    errors += [f"incident {i} has no flags" for i in stored.keys() - members.keys()]
    horizon = max(filter(None, [*newest, at_cursor]), default=None)
    for i, group in members.items():
        row = stored.get(i)
        if row is None:
            errors.append(f"flags {[f.source_id for f in group]} point at missing incident {i}")
            continue
        times = [as_utc(f.source_timestamp) for f in group]
        summary = (row.rows, row.first_source_id, row.last_source_id,
                   as_utc(row.first_timestamp), as_utc(row.last_timestamp),
                   round(row.max_severity, 6))
        truth = (len(group), min(f.source_id for f in group), max(f.source_id for f in group),
                 min(times), max(times), round(max(f.severity for f in group), 6))
        if summary != truth:
            errors.append(f"incident {i} says {summary}, its flags {truth}")
        current = row.generation == max(f.generation for f in flags)
        should = "open" if current and (horizon is None or max(times) >= horizon - gap) \
            else "closed"
        if row.state != should:
            errors.append(f"incident {i} is {row.state}, should be {should} at {horizon}")
    return errors
