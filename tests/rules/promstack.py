"""A real Prometheus, Alertmanager and webhook receiver for the alerting tests, on
loopback and free ports, with short intervals; every wait is bounded."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pgserver import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
#: Alert "for" durations in the end-to-end test (the shipped ones are minutes).
TEST_FOR = "2s"
START_TIMEOUT_SECONDS = 30.0


def binary(*names: str) -> str:
    """The first of ``names`` on PATH; fail under CI, skip elsewhere, when none is."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{names[0]} is missing but CI=true: .ci/run installs it")
    pytest.skip(f"{names[0]} is not installed (apt-get install prometheus prometheus-alertmanager)")


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25) -> Any:
    """``predicate()``'s first truthy value; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(interval)


class Webhook:
    """Collects Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        received = self.notifications

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def alerts(self, status: str = "firing") -> list[dict[str, Any]]:
        """Every alert received with ``status``."""
        return [alert for n in self.notifications for alert in n["alerts"]
                if alert["status"] == status]

    def firing(self, alertname: str, **labels: str) -> list[dict[str, Any]]:
        """The firing alerts called ``alertname`` with ``labels``."""
        return [a for a in self.alerts() if a["labels"].get("alertname") == alertname
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def shortened_rules(path: Path) -> Path:
    """rules.yml with every alert's ``for`` shortened to ``TEST_FOR``."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                rule["for"] = TEST_FOR
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@contextlib.contextmanager
def _running(command: list[str], log: Path, port: int, name: str) -> Iterator[str]:
    """``command`` running (output to ``log``) until its ``/-/ready`` on ``port``
    answers; yields its URL and stops it afterwards."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200,
                   START_TIMEOUT_SECONDS, f"{name} did not become ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def alertmanager(workdir: Path, webhook: Webhook) -> Iterator[str]:
    """A running Alertmanager routing everything to ``webhook``; yields its URL."""
    command = binary("prometheus-alertmanager", "alertmanager")
    port = free_port()
    config = workdir / "alertmanager.yml"
    config.write_text(yaml.safe_dump({
        "route": {"receiver": "webhook", "group_by": ["alertname", "monitor"],
                  "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "webhook",
                       "webhook_configs": [{"url": webhook.url, "send_resolved": True}]}],
    }))
    with _running([command, f"--config.file={config}",
                   f"--storage.path={workdir / 'alertmanager-data'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                  workdir / "alertmanager.log", port, "Alertmanager") as url:
        yield url


@contextlib.contextmanager
def prometheus(workdir: Path, target: str, alertmanager_url: str) -> Iterator[str]:
    """A running Prometheus scraping ``target`` (job anomaly-monitor) every second,
    evaluating the shipped rules (shortened ``for``) every second; yields its URL."""
    command = binary("prometheus")
    port = free_port()
    rules = shortened_rules(workdir / "rules.yml")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [
            {"targets": [urllib.parse.urlparse(alertmanager_url).netloc]}]}]},
        "scrape_configs": [{"job_name": "anomaly-monitor", "scrape_timeout": "900ms",
                            "static_configs": [{"targets": [target]}]}],
    }))
    with _running([command, f"--config.file={config}",
                   f"--storage.tsdb.path={workdir / 'prometheus-data'}",
                   f"--web.listen-address=127.0.0.1:{port}"],
                  workdir / "prometheus.log", port, "Prometheus") as url:
        yield url


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """The instant vector of ``expr`` now."""
    data = get_json(f"{prometheus_url}/api/v1/query?"
                    + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    return data["data"]["result"]
