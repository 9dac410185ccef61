"""The demo's second monitor: host metrics, one row per host per step, each host with
its own level and daily cycle, and labelled injected episodes of three kinds.

* ``level_shift``: a host's cpu moves up for good (the first ``SHIFT_LABEL_SAMPLES``
  samples are labelled; after that the new level is its normal);
* ``stuck``: a host's cpu reports one value for a while;
* ``spike``: a host's latency jumps for a few samples.

Scored by a window monitor with ``entity_column = "host"``, each host against its own
baseline: a cpu of 70 is normal for a busy host and an anomaly for an idle one.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import sqlalchemy as sa

HOST_TABLE = "host_metrics"
HOST_FEATURES = ("cpu", "latency_ms")
HOST_KINDS = ("level_shift", "stuck", "spike")
N_HOSTS = 6
#: Simulated seconds between two samples of a host (history and live).
HOST_STEP_SECONDS = 300
#: Samples of a level shift that are labelled anomalous (then it is the new normal).
SHIFT_LABEL_SAMPLES = 12
#: Samples per host between the starts of two episodes (drawn uniformly), live only.
HOST_EPISODE_GAP = (60, 120)


class Hosts:
    """A seeded simulator of per-host metrics with injected anomalies."""

    def __init__(self, seed: int = 11, n_hosts: int = N_HOSTS) -> None:
        self.rng = np.random.default_rng(seed)
        self.names = [f"web-{i + 1:02d}" for i in range(n_hosts)]
        self.level = np.linspace(15.0, 70.0, n_hosts)
        self.amplitude = self.level * 0.3
        self.phase = self.rng.uniform(0, 2 * math.pi, n_hosts)
        self.latency = self.rng.uniform(20.0, 80.0, n_hosts)
        self.shift = np.zeros(n_hosts)
        self.episodes: list[dict[str, Any] | None] = [None] * n_hosts
        self.until = self.rng.integers(*HOST_EPISODE_GAP, size=n_hosts)
        #: The simulated clock's zero (the history's start), when set.
        self.origin: dt.datetime | None = None

    def _episode(self, host: int) -> dict[str, Any]:
        kind = HOST_KINDS[int(self.rng.integers(len(HOST_KINDS)))]
        length = {"level_shift": SHIFT_LABEL_SAMPLES, "stuck": 20, "spike": 3}[kind]
        if kind == "level_shift":
            self.shift[host] += self.amplitude[host] * float(self.rng.choice([-1.5, 2.0]))
        return {"kind": kind, "left": length, "stuck": None}

    def sample(self, host: int, when: float,
               anomalies: bool) -> tuple[dict[str, float], str | None]:
        """One host's sample at epoch ``when``; the injected kind or ``None``."""
        day = 2 * math.pi * when / 86_400
        cpu = self.level[host] + self.shift[host] + self.amplitude[host] * math.sin(
            day + self.phase[host]) + float(self.rng.normal(0, 1.5))
        latency = self.latency[host] * (1 + 0.004 * cpu) + float(self.rng.normal(0, 2))
        kind = None
        if anomalies:
            self.until[host] -= 1
            if self.episodes[host] is None and self.until[host] <= 0:
                self.episodes[host] = self._episode(host)
                self.until[host] = int(self.rng.integers(*HOST_EPISODE_GAP))
            episode = self.episodes[host]
            if episode is not None:
                kind = episode["kind"]
                if kind == "stuck":
                    episode["stuck"] = episode["stuck"] or round(cpu, 1)
                    cpu = episode["stuck"]
                elif kind == "spike":
                    latency *= 4.0
                else:  # level_shift: already in self.shift
                    cpu = self.level[host] + self.shift[host] + self.amplitude[host] * \
                        math.sin(day + self.phase[host]) + float(self.rng.normal(0, 1.5))
                episode["left"] -= 1
                if episode["left"] == 0:
                    self.episodes[host] = None
        return {"cpu": max(0.0, cpu), "latency_ms": max(1.0, latency)}, kind

    def rows(self, start: dt.datetime, steps: int, anomalies: bool,
             stamp: dt.datetime | None = None) -> list[dict[str, Any]]:
        """``steps`` samples of every host from simulated time ``start``, in time order,
        stamped with their simulated time (or all with ``stamp``: live rows)."""
        out = []
        for step in range(steps):
            when = start + dt.timedelta(seconds=step * HOST_STEP_SECONDS)
            ts = stamp or when
            since = (when - self.origin).total_seconds() if self.origin else when.timestamp()
            for host, name in enumerate(self.names):
                values, kind = self.sample(host, since, anomalies)
                out.append({"ts": ts, "host": name, **values, "is_anomaly": int(kind is not None),
                            "anomaly_kind": kind})
        return out


def create_host_table(engine: sa.Engine) -> sa.Table:
    """The host metrics table of the demo."""
    metadata = sa.MetaData()
    table = sa.Table(
        HOST_TABLE, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("host", sa.String(32), nullable=False),
        *(sa.Column(name, sa.Float) for name in HOST_FEATURES),
        sa.Column("is_anomaly", sa.Integer, nullable=False),
        sa.Column("anomaly_kind", sa.String(32)),
    )
    metadata.create_all(engine)
    return table
