"""Test helpers: a source table of correlated sensor rows and monitor settings for it."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
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
