"""The exporter serves the registry over HTTP in the Prometheus text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from anomaly_monitor.metrics import Metrics
from tests.helpers import scrape


def test_metrics_are_scraped_over_http():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_monitors({"plant": 60.0})
    metrics.set_model("plant", "3", "vae", 1.5)
    body = scrape(registry)
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert {"anomaly_monitor_rows_scored", "anomaly_monitor_batch_duration_seconds",
            "anomaly_monitor_model_info", "anomaly_monitor_threshold"} <= set(families)
    info = [s for s in families["anomaly_monitor_model_info"].samples if s.value == 1]
    assert info[0].labels == {"monitor": "plant", "version": "3", "kind": "vae"}
    assert not [s for s in families["anomaly_monitor_model_info"].samples
                if s.labels["version"] == "none"]


def test_a_scrape_carries_only_the_series_rules_and_dashboard_read():
    registry = CollectorRegistry()
    Metrics(registry).init_monitors({f"m{i}": 5.0 for i in range(50)})
    text = scrape(registry)
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [s for s in series if "_created" in s]  # client_python's extra series
    # 57 per monitor before the trim; 42 with the two incident series, 45 with
    # feedback, 46 with suppression, 49 with drift (retraining's only where configured).
    assert len(series) <= 49 * 50


def test_more_monitors_than_threads_share_them_and_hold_no_reader_between_polls(tmp_path):
    from anomaly_monitor.db import create_engine
    from anomaly_monitor.worker import MAX_THREADS, Worker
    from tests.helpers import monitor_settings, settings

    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = create_engine(url)
    many = [monitor_settings(name=f"m{i}") for i in range(4 * MAX_THREADS)]
    worker = Worker(settings(url, *many), engine, Metrics(CollectorRegistry()), device="cpu")
    assert worker.threads == MAX_THREADS
    assert {r.share for r in worker.runners.values()} == {0.25}
    few = Worker(settings(url, *many[:3]), engine, Metrics(CollectorRegistry()), device="cpu")
    assert few.threads == 3 and {r.share for r in few.runners.values()} == {1.0}
    engine.dispose()
