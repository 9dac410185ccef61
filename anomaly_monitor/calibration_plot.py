"""``calibrate --plot``: the score histograms and thresholds of a calibration plan.

Both histograms are outlines over a log score axis, so that neither hides the
other; with a label column the held-out rows are split into labelled normal rows
and labelled anomalies. The current and the new threshold are drawn apart (one
line when they are the same), each with its value and what it flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from anomaly_monitor.lifecycle import known_labels, method_label
from anomaly_monitor.registry import RegistryError

if TYPE_CHECKING:
    from anomaly_monitor.calibration_plan import CalibrationPlan

#: Histogram bins over the score range.
BINS = 80
FIGURE_INCHES = (9.0, 5.0)
DPI = 110


def plot_calibration(plan: CalibrationPlan, path: str) -> None:
    """Write the plan's score histograms with the current and new thresholds as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise RegistryError(
            "--plot needs matplotlib: pip install 'anomaly-monitor[plot]'") from None
    current, new = plan.version.threshold, plan.chosen.value
    fig, ax = plt.subplots(figsize=FIGURE_INCHES)
    bins = _bins(plan, current, new)
    for scores, style in _histograms(plan):
        scores = scores[np.isfinite(scores) & (scores > 0)]  # a log axis shows no others
        if scores.size:
            ax.hist(scores, bins=bins, histtype="step", linewidth=1.8, **style)
    rate = _flag_rate(plan.holdout_scores, new)
    if np.isclose(current, new, rtol=1e-9, atol=0.0):
        ax.axvline(new, color="crimson", linewidth=2,
                   label=f"threshold {new:.4g}, current and new ({rate} of held-out)")
    else:
        ax.axvline(current, color="dimgrey", linestyle="--", linewidth=2,
                   label=f"current threshold {current:.4g} "
                         f"({_flag_rate(plan.holdout_scores, current)} of held-out)")
        ax.axvline(new, color="crimson", linewidth=2,
                   label=f"new threshold {new:.4g}, {method_label(plan.chosen)} "
                         f"({rate} of held-out)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:.1e}"[0] in "25" else ""))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_xlabel("anomaly score (higher = more anomalous; rows right of a line are flagged)")
    ax.set_ylabel("rows per bin")
    ax.set_title(f"monitor {plan.version.monitor}, model version {plan.version.version}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _histograms(plan: CalibrationPlan) -> list[tuple[npt.NDArray[np.float64], dict[str, Any]]]:
    """The score sets to draw, with their colour and legend label."""
    parts: list[tuple[npt.NDArray[np.float64], dict[str, Any]]] = []
    if plan.labels_from == "feedback":  # the held-out rows, and the labelled flags apart
        parts.append((plan.holdout_scores, {
            "color": "tab:blue", "label": f"held-out rows ({plan.holdout_scores.size})"}))
    if plan.labelled is not None:
        scores, labels = plan.labelled
        known_scores, truth = known_labels(scores, labels)
        normal, anomalous = known_scores[~truth], known_scores[truth]
        what = "flags labelled" if plan.labels_from == "feedback" else "held-out, labelled"
        parts += [
            (normal, {"color": "tab:green" if plan.labels_from == "feedback" else "tab:blue",
                      "label": f"{what} normal ({normal.size})"}),
            (anomalous, {"color": "tab:red", "label": f"{what} anomaly ({anomalous.size})"}),
        ]
        unknown = scores[np.isnan(labels)]
        if unknown.size:
            parts.append((unknown, {"color": "tab:purple",
                                    "label": f"held-out, unlabelled ({unknown.size})"}))
    else:
        parts.append((plan.holdout_scores, {
            "color": "tab:blue", "label": f"held-out rows ({plan.holdout_scores.size})"}))
    if plan.recent_scores.size:
        first, last = plan.recent_ids or (0, 0)
        parts.append((plan.recent_scores, {
            "color": "tab:orange",
            "label": f"rows after training ({plan.recent_scores.size}, ids {first}-{last})"}))
    return parts


def _bins(plan: CalibrationPlan, current: float, new: float) -> npt.NDArray[np.float64] | int:
    """Log-spaced bins over every score and both thresholds."""
    everything = np.concatenate([plan.holdout_scores, plan.recent_scores, [current, new]])
    everything = everything[np.isfinite(everything) & (everything > 0)]
    if not everything.size:
        return 10
    low, high = max(everything.min(), 1e-6), max(everything.max() * 1.05, 1e-5)
    return np.geomspace(low, high, BINS)


def _flag_rate(scores: npt.NDArray[np.float64], threshold: float) -> str:
    return f"{(scores > threshold).mean():.2%}" if scores.size else "-"
