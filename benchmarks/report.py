"""Markdown tables of the quality benchmark: per protocol, the targets, the calibration."""

from __future__ import annotations

from typing import Any

import numpy as np

Result = dict[str, Any]


def _means(results: list[Result], metric: str) -> dict[tuple[str, str], float]:
    cells: dict[tuple[str, str], list[float]] = {}
    for r in results:
        cells.setdefault((r["dataset"], r["detector"]), []).append(r[metric])
    return {key: float(np.mean(v)) for key, v in cells.items()}


def mean_over_datasets(results: list[Result], detector: str, metric: str) -> float:
    """The mean over datasets of the seed-averaged ``metric`` of ``detector``."""
    cells = _means([r for r in results if r["detector"] == detector], metric)
    return float(np.mean(list(cells.values()))) if cells else float("nan")


def render_protocol(protocol: str, results: list[Result], detectors: list[str]) -> str:
    """AUROC and AUPRC per dataset and detector with means and wins, and fit seconds."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    lines = [f"## Protocol: {protocol}", ""]
    for metric, title in (("auroc", "AUROC"), ("auprc", "AUPRC (average precision)")):
        cell = _means(results, metric)
        lines += [f"### {title}", "", "| dataset | " + " | ".join(detectors) + " |",
                  "|---|" + "---:|" * len(detectors)]
        wins = dict.fromkeys(detectors, 0)
        for d in datasets:
            row = [cell.get((d, det), float("nan")) for det in detectors]
            best = np.nanmax(row)
            for det, v in zip(detectors, row, strict=True):
                wins[det] += int(v == best)
            lines.append(f"| {d} | " + " | ".join(
                f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in row) + " |")
        means = [mean_over_datasets(results, det, metric) for det in detectors]
        lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
        lines.append("| wins | " + " | ".join(str(wins[det]) for det in detectors) + " |")
        lines.append("")
    seconds = _means(results, "fit_seconds")
    total = [sum(seconds.get((d, det), 0.0) for d in datasets) for det in detectors]
    lines += ["### Fit seconds (summed over datasets, mean over seeds, 1 thread)", "",
              "| " + " | ".join(detectors) + " |", "|" + "---:|" * len(detectors),
              "| " + " | ".join(f"{t:.1f}" for t in total) + " |", ""]
    return "\n".join(lines)


def _target_rows(results: list[Result], ours: list[str]) -> list[tuple[str, str, float, bool]]:
    rows = []
    by = {p: [r for r in results if r["protocol"] == p]
          for p in ("contaminated", "clean", "telemetry")}
    baselines = sorted({r["detector"] for r in results if r["detector"] not in ours
                        and r["protocol"] != "calibration"})

    def best(protocol: str, metric: str) -> tuple[str, float]:
        values = {k: mean_over_datasets(by[protocol], k, metric) for k in ours}
        kind = max(values, key=lambda k: values[k])
        return kind, values[kind]

    if by["contaminated"] and "IsolationForest" in baselines:
        kind, auroc = best("contaminated", "auroc")  # one kind judged on both metrics
        auprc = mean_over_datasets(by["contaminated"], kind, "auprc")
        margin = auroc - mean_over_datasets(by["contaminated"], "IsolationForest", "auroc")
        rows.append(("contaminated", f"{kind} mean AUROC - IsolationForest >= +0.01",
                     margin, margin >= 0.01))
        margin = auprc - mean_over_datasets(by["contaminated"], "IsolationForest", "auprc")
        rows.append(("contaminated", f"{kind} mean AUPRC - IsolationForest >= 0",
                     margin, margin >= 0))
    if by["clean"] and baselines:
        kind, auroc = best("clean", "auroc")
        top = max(baselines, key=lambda b: mean_over_datasets(by["clean"], b, "auroc"))
        margin = auroc - mean_over_datasets(by["clean"], top, "auroc")
        rows.append(("clean", f"{kind} mean AUROC - best baseline ({top}) >= +0.02",
                     margin, margin >= 0.02))
    if by["telemetry"] and "PCA" in baselines:
        pca = mean_over_datasets(by["telemetry"], "PCA", "auroc")
        for kind in ours:
            margin = mean_over_datasets(by["telemetry"], kind, "auroc") - pca
            rows.append(("telemetry", f"{kind} mean AUROC - PCA >= -0.01", margin,
                         margin >= -0.01))
    return rows


def render_targets(results: list[Result], ours: list[str]) -> str:
    """The issue's targets, each with its margin and whether it is met."""
    rows = _target_rows(results, ours) if ours else []
    if not rows:
        return ""
    lines = ["## Targets", "", "| protocol | target | margin | met |", "|---|---|---:|---|"]
    lines += [f"| {p} | {t} | {m:+.3f} | {'yes' if ok else 'no'} |" for p, t, m, ok in rows]
    return "\n".join(lines) + "\n"


def render_calibration(results: list[Result]) -> str:
    """Test-part flag rate, FPR, precision and recall of each threshold method, per dataset."""
    if not results:
        return ""
    methods = [k for k, v in results[0].items() if isinstance(v, dict)]
    kind = results[0]["detector"]
    head = " | ".join(f"{m} {c}" for m in methods for c in ("flags", "FPR", "prec.", "recall"))
    lines = [f"## Calibration at target FPR 1% ({kind}, held-out rows with their anomalies)", "",
             f"| dataset | anomalies | {head} |", "|---|---:|" + "---:|" * 4 * len(methods)]
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    for d in [*datasets, "mean"]:
        chosen = results if d == "mean" else [r for r in results if r["dataset"] == d]
        cells = [float(np.mean([r["anomaly_rate"] for r in chosen]))]
        for m in methods:
            for c in ("flag_rate", "fpr", "precision", "recall"):
                cells.append(float(np.nanmean([r[m][c] for r in chosen])))
        lines.append(f"| {d} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"
