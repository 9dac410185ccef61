"""The deployment files: Prometheus rules and their unit tests (promtool), the
exporter's metrics (promtool check metrics), Alertmanager and Prometheus configs, the
systemd unit, the container image, compose and Kubernetes manifests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from anomaly_monitor import __version__
from anomaly_monitor.config import load_settings
from anomaly_monitor.metrics import Metrics
from tests.helpers import scrape
from tests.rules.promstack import DEPLOY, RULES, binary

ROOT = DEPLOY.parent
K8S = DEPLOY / "k8s"
IMAGE = f"anomaly-monitor:{__version__}"


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd,
                          check=False)


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
            if "alert" in r]


def test_rules_pass_promtool_check_and_their_unit_tests():
    promtool = binary("promtool")
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", "rules_test.yml", cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing():
    cases = [case for group in yaml.safe_load((RULES.parent / "rules_test.yml").read_text())
             ["tests"] for case in group.get("alert_rule_test", [])]
    for rule in alerts():
        name = rule["alert"]
        firing = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        silent = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert firing and silent, f"{name} needs a firing and a not-firing test"


def test_every_alert_has_a_severity_and_names_what_is_wrong():
    for rule in alerts():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        subject = "instance" if rule["alert"].startswith("AnomalyMonitorTarget") else "monitor"
        if rule["alert"] != "AnomalyMonitorTargetAbsent":  # no target: nothing to name
            assert f"$labels.{subject}" in summary and f"$labels.{subject}" in description


def test_the_exporter_passes_promtool_check_metrics_without_warnings():
    promtool = binary("promtool")
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.init_monitors({"orders": 30.0})
    metrics.set_model("orders", "2", "dae", 1.25, 0.01)
    body = scrape(registry)
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), \
        checked.stdout + checked.stderr
    # Every series the rules and the dashboard use exists from the start.
    for name in ("anomaly_monitor_last_success_timestamp_seconds",
                 "anomaly_monitor_interval_seconds", "anomaly_monitor_expected_anomaly_ratio",
                 'anomaly_monitor_batches_total{monitor="orders",outcome="error"} 0.0',
                 'anomaly_monitor_rows_quarantined_total{monitor="orders",reason="null"} 0.0',
                 'anomaly_monitor_severity_bucket{le="90.0",monitor="orders"} 0.0'):
        assert name in body, name


def test_prometheus_and_alertmanager_configs_are_valid():
    promtool = binary("promtool")
    checked = run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    amtool = binary("amtool")
    checked = run(amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path):
    text = (DEPLOY / "systemd" / "anomaly-monitor.service").read_text()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "User=anomaly-monitor",
                    "ProtectHome=yes", "PrivateTmp=yes", "Restart=always",
                    "ExecReload=/bin/kill -HUP $MAINPID"):
        assert setting in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this environment's entry point.
    entry = Path(sys.executable).with_name("anomaly-monitor")
    unit = tmp_path / "anomaly-monitor.service"
    unit.write_text(text.replace("/opt/anomaly-monitor/bin/anomaly-monitor", str(entry)))
    verified = run(analyze, "verify", str(unit))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _dockerfile() -> tuple[str, set[int]]:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text).group(1)
    ports = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    return version, ports


def _k8s() -> dict[str, list[dict]]:
    documents: dict[str, list[dict]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents.setdefault(document["kind"], []).append(document)
    return documents


def test_the_image_version_is_the_package_version():
    version, ports = _dockerfile()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert version == project["version"] == __version__
    assert ports == {9108}


def test_kubernetes_manifests_name_only_the_image_and_ports_of_the_dockerfile():
    documents = _k8s()
    assert {"Deployment", "ConfigMap", "Secret", "Service", "PrometheusRule"} <= set(documents)
    _, exposed = _dockerfile()
    deployment = documents["Deployment"][0]["spec"]["template"]["spec"]
    containers = deployment["containers"] + deployment.get("initContainers", [])
    assert {c["image"] for c in containers} == {IMAGE}
    worker = deployment["containers"][0]
    named = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert set(named.values()) <= exposed
    for probe in ("livenessProbe", "readinessProbe"):
        get = worker[probe]["httpGet"]
        assert get["path"] == "/metrics" and named[get["port"]] in exposed
    secret = documents["Secret"][0]
    for variable in worker["env"]:
        ref = variable["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    service = next(d for d in documents["Service"] if d["apiVersion"] == "v1")
    assert all(p["targetPort"] in named for p in service["spec"]["ports"])


def test_the_prometheus_rule_holds_the_same_groups_as_rules_yml():
    rule = _k8s()["PrometheusRule"][0]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_shipped_configs_load(tmp_path):
    config_map = _k8s()["ConfigMap"][0]["data"]["anomaly-monitor.toml"]
    for text in (config_map, (DEPLOY / "docker" / "anomaly-monitor.toml").read_text()):
        path = tmp_path / "anomaly-monitor.toml"
        path.write_text(text)
        settings = load_settings(path, environ={})
        assert settings.metrics_port == 9108 and settings.metrics_host == "0.0.0.0"
        assert [m.name for m in settings.monitors] == ["orders"]


def test_compose_runs_the_image_with_the_deploy_files():
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "anomaly-monitor", "prometheus", "alertmanager", "grafana"} <= \
        set(services)
    assert services["anomaly-monitor"]["image"] == services["migrate"]["image"] == IMAGE
    mounts = " ".join(v for s in services.values() for v in s.get("volumes", []))
    for path in ("../prometheus/rules.yml", "../grafana/dashboard.json",
                 "../alertmanager/alertmanager.yml", "../grafana/provisioning/dashboards"):
        assert path in mounts and (DEPLOY / "docker" / path).resolve().exists()
