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
