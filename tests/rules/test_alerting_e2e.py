"""End to end: a real Prometheus scrapes a running ``anomaly-monitor run`` and evaluates
the shipped rules; a real Alertmanager routes the alerts to a webhook in this test."""

from __future__ import annotations

import json
import re
import signal

import pytest

from anomaly_monitor.db import create_engine
from anomaly_monitor.migrate import upgrade
from tests.faults.harness import start_daemon, write_config
from tests.helpers import Sensors, insert_rows, monitor_settings, trained_plant
from tests.pgserver import free_port
from tests.rules.promstack import (
    DEPLOY,
    Webhook,
    alertmanager,
    prometheus,
    query,
    wait_until,
)

ALERT_TIMEOUT_SECONDS = 90.0
#: Grafana variables, as the test fills them in.
GRAFANA_VARIABLES = {"$monitor": "plant", "$__rate_interval": "1m", "${datasource}": ""}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, variables filled in."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            if target["datasource"]["type"] != "prometheus":
                continue  # the SQL panel: tests/rules/test_grafana_sql.py
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unfilled variable in {expr!r}"
            queries.append(expr)
    return queries


@pytest.mark.slow
def test_anomalies_and_a_stopped_worker_reach_the_webhook(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'monitor.db'}"
    engine = create_engine(url)
    upgrade(engine)
    sensors = Sensors()
    table, _, _, _ = trained_plant(engine, monitor_settings(interval_seconds=1.0),
                                   sensors=sensors, rows=600)
    metrics_port = free_port()
    monkeypatch.setenv("ANOMALY_MONITOR_METRICS_PORT", str(metrics_port))
    config = write_config(tmp_path / "monitor.toml", url, interval=1.0, batch_size=500,
                          lease=3.0)
    # The burst's incident (severity about 80) raises AnomalyMonitorIncident at 50.
    # A daily retrain (not due: version 1 was just trained) gives the retrain panel data.
    config.write_text(config.read_text() + "\n[monitor.incidents]\nalert_severity = 50\n"
                      "\n[monitor.retrain]\nevery_seconds = 86400\n")
    webhook = Webhook()
    daemon = start_daemon(config, tmp_path / "daemon.log")
    try:
        with alertmanager(tmp_path, webhook) as am_url, \
                prometheus(tmp_path, f"127.0.0.1:{metrics_port}", am_url) as prom_url:
            wait_until(lambda: query(prom_url, 'up{job="anomaly-monitor"} == 1'),
                       ALERT_TIMEOUT_SECONDS, "Prometheus did not scrape the worker")
            # A normal stretch, then a burst of anomalies far above the calibrated rate.
            insert_rows(engine, table, sensors.normal(100), step_seconds=0.01)
            insert_rows(engine, table, sensors.anomalous(100), step_seconds=0.01)
            wait_until(lambda: webhook.firing("AnomalyMonitorHighAnomalyRate",
                                              monitor="plant", severity="warning"),
                       ALERT_TIMEOUT_SECONDS,
                       "the anomaly-rate alert did not reach the webhook")
            alert = webhook.firing("AnomalyMonitorHighAnomalyRate")[0]
            assert "plant" in alert["annotations"]["summary"]
            wait_until(lambda: webhook.firing("AnomalyMonitorIncident", monitor="plant",
                                              severity="critical"),
                       ALERT_TIMEOUT_SECONDS, "the incident alert did not reach the webhook")
            incident = webhook.firing("AnomalyMonitorIncident")[0]
            assert "anomaly-monitor incidents plant`" in \
                incident["annotations"]["description"]

            # The rate is compared with the active version's calibrated rate (about 1%).
            assert query(prom_url, 'anomaly_monitor_expected_anomaly_ratio{monitor="plant"} '
                                   "> 0.001 < 0.05")
            for expr in dashboard_queries():  # every dashboard panel has data
                assert query(prom_url, expr), f"no data for dashboard query {expr!r}"

            assert not webhook.firing("AnomalyMonitorTargetDown")
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
            wait_until(lambda: webhook.firing("AnomalyMonitorTargetDown",
                                              severity="critical"),
                       ALERT_TIMEOUT_SECONDS,
                       "the target-down alert did not reach the webhook after the "
                       "worker stopped")
            down = webhook.firing("AnomalyMonitorTargetDown")[0]
            assert re.search(rf"127\.0\.0\.1:{metrics_port}", down["annotations"]["summary"])
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        webhook.close()
        engine.dispose()
