"""``backtest --plot``: scores over time, the thresholds and the flags of a backtest."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import numpy as np

from anomaly_monitor.registry import RegistryError

if TYPE_CHECKING:
    from anomaly_monitor.backtest import Backtest

FIGURE_INCHES = (11.0, 5.0)
DPI = 110
#: At most this many rows are drawn (evenly spaced, every flag kept).
MAX_POINTS = 200_000


def plot_backtest(report: Backtest, path: str) -> None:
    """Write the backtest's scores over time (log scale), its thresholds, and its flags
    (suppressed ones apart) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RegistryError(
            "--plot needs matplotlib: pip install 'anomaly-monitor[plot]'") from None
    times, scores = report.times, report.scores
    shown = np.isfinite(times) & np.isfinite(scores) & (scores > 0)
    step = max(1, int(shown.sum()) // MAX_POINTS)
    when = np.array([dt.datetime.fromtimestamp(t, dt.UTC) for t in times[shown][::step]])
    fig, ax = plt.subplots(figsize=FIGURE_INCHES)
    ax.plot(when, scores[shown][::step], ",", color="tab:blue", alpha=0.6,
            label=f"scores ({report.rows} rows)")
    main = report.runs[0]
    for run, style in zip(report.runs, ("-", "--", "-.", ":"), strict=False):
        ax.axhline(run.threshold, color="crimson" if run is main else "dimgrey",
                   linestyle=style, linewidth=1.5,
                   label=f"threshold {run.threshold:.4g} ({run.label}): {len(run.flags)} "
                         f"flags, {run.incidents} incidents")
    for suppressed, style in ((False, {"color": "crimson", "label": "flags"}),
                              (True, {"color": "grey", "label": "suppressed flags"})):
        flags = [f for f in main.flags if bool(f["suppressed_by"]) == suppressed
                 and f["source_timestamp"] is not None and f["score"] > 0]
        if flags:
            ax.scatter([f["source_timestamp"] for f in flags], [f["score"] for f in flags],
                       s=12, zorder=3, **style)
    ax.set_yscale("log")
    ax.set_xlabel("row timestamp (UTC)")
    ax.set_ylabel("anomaly score (higher = more anomalous)")
    ax.set_title(f"monitor {report.monitor}, version {report.version} ({report.status}): "
                 f"{report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", framealpha=0.9)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
