"""Detection quality on the ADBench datasets against IsolationForest and PyOD, in one run.

Protocol (../shared/datasets/README.md): for each seed, a stratified 70/30
split; every detector gets features standardised by a StandardScaler fitted on
the training part, is fitted unsupervised on the whole training part (anomalies
left in) and scores the test part; AUROC and AUPRC (average precision) are
averaged over seeds.

    python -m benchmarks.quality                      # everything, 3 seeds, 2 processes
    python -m benchmarks.quality --datasets 6_cardio 42_WBC --seeds 0 --detectors dae
    python -m benchmarks.quality --set dae.trim_fraction=0.05   # a non-default experiment

The table goes to stdout and, for a full default run, to benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.datasets import adbench_files, load_adbench

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("vae", "dae", "sae")
BASELINES = ("IsolationForest", "PyOD-AutoEncoder", "PyOD-VAE")


@dataclass(frozen=True)
class Task:
    detector: str
    dataset: Path
    seed: int
    overrides: tuple[tuple[str, Any], ...]


def _make_detector(name: str, seed: int, overrides: dict[str, Any]) -> Any:
    if name in OURS:
        from anomaly_monitor import AutoencoderDetector

        return AutoencoderDetector(kind=name, random_state=seed, device="cpu", **overrides)
    if name == "IsolationForest":
        from sklearn.ensemble import IsolationForest

        return IsolationForest(random_state=seed)
    if name == "PyOD-AutoEncoder":
        from pyod.models.auto_encoder import AutoEncoder

        return AutoEncoder(random_state=seed, verbose=0, device="cpu")
    if name == "PyOD-VAE":
        from pyod.models.vae import VAE

        return VAE(random_state=seed, verbose=0, device="cpu")
    raise ValueError(f"unknown detector {name!r}")


def _scores(detector: Any, name: str, x_test: np.ndarray) -> np.ndarray:
    scores = detector.decision_function(x_test)
    # scikit-learn's IsolationForest: lower = more abnormal; flip to higher = more anomalous.
    return -scores if name == "IsolationForest" else scores


def run_task(task: Task) -> dict[str, Any]:
    """Fit one detector on one split of one dataset; return AUROC, AUPRC and timing."""
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    torch.set_num_threads(1)
    X, y = load_adbench(task.dataset)
    x_train, x_test, _, y_test = train_test_split(
        X, y, test_size=0.3, stratify=y, random_state=task.seed
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    detector = _make_detector(task.detector, task.seed, dict(task.overrides))
    start = time.perf_counter()
    detector.fit(x_train)
    fit_seconds = time.perf_counter() - start
    scores = _scores(detector, task.detector, x_test)
    return {
        "detector": task.detector,
        "dataset": task.dataset.stem,
        "seed": task.seed,
        "auroc": float(roc_auc_score(y_test, scores)),
        "auprc": float(average_precision_score(y_test, scores)),
        "fit_seconds": fit_seconds,
    }


def _parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, raw = item.partition("=")
        kind, _, param = key.partition(".")
        if not raw or not param or kind not in (*OURS, "all"):
            raise SystemExit(
                f"--set expects KIND.PARAM=JSON with KIND in {OURS} or all; got {item!r}"
            )
        for k in OURS if kind == "all" else (kind,):
            overrides.setdefault(k, {})[param] = json.loads(raw)
    return overrides


def summarize(results: list[dict[str, Any]], detectors: list[str]) -> str:
    """Markdown tables of mean AUROC / AUPRC per dataset and detector, with means and wins."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    cell: dict[tuple[str, str, str], float] = {}
    for metric in ("auroc", "auprc", "fit_seconds"):
        for d in datasets:
            for det in detectors:
                values = [r[metric] for r in results if r["dataset"] == d and r["detector"] == det]
                cell[(metric, d, det)] = float(np.mean(values)) if values else float("nan")
    lines: list[str] = []
    for metric, title in (("auroc", "AUROC"), ("auprc", "AUPRC (average precision)")):
        lines += [f"### {title}", "", "| dataset | " + " | ".join(detectors) + " |",
                  "|---|" + "---:|" * len(detectors)]
        for d in datasets:
            row = [cell[(metric, d, det)] for det in detectors]
            best = np.nanmax(row)
            lines.append(f"| {d} | " + " | ".join(
                f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in row) + " |")
        means = [np.nanmean([cell[(metric, d, det)] for d in datasets]) for det in detectors]
        wins = [sum(cell[(metric, d, det)] == max(cell[(metric, d, o)] for o in detectors)
                    for d in datasets) for det in detectors]
        lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
        lines.append("| wins | " + " | ".join(str(w) for w in wins) + " |")
        lines.append("")
    total = [sum(cell[("fit_seconds", d, det)] for d in datasets) for det in detectors]
    lines += ["### Fit time (seconds summed over datasets, mean over seeds, 1 thread)", "",
              "| " + " | ".join(detectors) + " |", "|" + "---:|" * len(detectors),
              "| " + " | ".join(f"{t:.1f}" for t in total) + " |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", help="dataset stems (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--detectors", nargs="*", default=[*OURS, *BASELINES])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--set", action="append", default=[], metavar="KIND.PARAM=JSON",
                        help="override a hyperparameter of our detectors (experiments only)")
    parser.add_argument("--output", type=Path, help="markdown file to write")
    args = parser.parse_args(argv)
    files = [f for f in adbench_files() if not args.datasets or f.stem in args.datasets]
    overrides = _parse_overrides(args.set)
    tasks = [Task(det, f, seed, tuple(sorted(overrides.get(det, {}).items())))
             for f in files for seed in args.seeds for det in args.detectors]
    # Largest datasets first so the pool does not end on one long task.
    tasks.sort(key=lambda t: -t.dataset.stat().st_size)
    started = time.perf_counter()
    run: Callable[[Task], dict[str, Any]] = run_task
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, result in enumerate(pool.map(run, tasks), start=1):
            results.append(result)
            print(f"[{i}/{len(tasks)}] {result['detector']} {result['dataset']} seed "
                  f"{result['seed']}: AUROC {result['auroc']:.3f} ({result['fit_seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
    order = {f.stem: i for i, f in enumerate(files)}
    results.sort(key=lambda r: (order[r["dataset"]], r["seed"]))
    header = (f"Seeds {args.seeds}; {len(files)} datasets; "
              f"overrides {overrides or 'none'}; wall time {time.perf_counter() - started:.0f} s\n")
    table = summarize(results, args.detectors)
    print(header)
    print(table)
    default_run = (not args.datasets and not overrides and args.seeds == [0, 1, 2]
                   and args.detectors == [*OURS, *BASELINES])
    output = args.output or (RESULTS / "quality.md" if default_run else None)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("# Quality benchmark (python -m benchmarks.quality)\n\n"
                          + header + "\n" + table, encoding="utf-8")


if __name__ == "__main__":
    main()
