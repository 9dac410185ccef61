"""Detection quality against IsolationForest, PCA, kNN and PyOD, in one run, three protocols.

Protocols (ADBench data: ../shared/datasets/README.md; for each seed a stratified
70/30 split; features standardised by a StandardScaler fitted on the rows each
detector is fitted on; AUROC and AUPRC averaged over seeds):

``contaminated``
    fit on the whole training part, anomalies left in (the README's protocol);
``clean``
    fit on the normal rows of the training part only (a monitor trained on a
    period believed normal);
``telemetry``
    synthetic sensor families (``benchmarks.telemetry``: 8-64 sensors driven by
    2-12 latent factors; permuted-sensor, stuck-sensor and spike anomalies, 5%),
    fitted on the training part with its anomalies.

A calibration table follows: for each ADBench dataset, the package's default
kind is fitted on 80% of the training part, the default threshold method (and
``quantile`` for comparison) is calibrated at target FPR 1% on the other 20%
(anomalies left in, as in a monitor's held-out history), and the test part's
flag rate, precision and recall are reported.

    python -m benchmarks.quality                      # everything, 3 seeds, 2 processes
    python -m benchmarks.quality --protocols telemetry --seeds 0
    python -m benchmarks.quality --datasets 6_cardio --detectors dae PCA --protocols clean
    python -m benchmarks.quality --set dae.trim_fraction=0.05   # a non-default experiment

The tables go to stdout and, for a full default run, to benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.baselines import BASELINES, make_baseline
from benchmarks.datasets import adbench_files, load_adbench
from benchmarks.report import render_calibration, render_protocol, render_targets

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("vae", "dae", "sae")
PROTOCOLS = ("contaminated", "clean", "telemetry")
#: Target false-positive rate of the calibration table.
CALIBRATION_FPR = 0.01
#: Share of the training part held out for calibration in the calibration table.
HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Task:
    protocol: str  # one of PROTOCOLS, or "calibration"
    detector: str
    dataset: str
    seed: int
    overrides: tuple[tuple[str, Any], ...]


def _dataset(task: Task) -> tuple[np.ndarray, np.ndarray]:
    if task.protocol == "telemetry":
        from benchmarks.telemetry import FAMILIES, make_family

        family = next(f for f in FAMILIES if f.name == task.dataset)
        x, y, _ = make_family(family, seed=task.seed)
        return x, y
    return load_adbench(next(f for f in adbench_files() if f.stem == task.dataset))


def _make_detector(task: Task) -> Any:
    if task.detector in OURS:
        from anomaly_monitor import AutoencoderDetector

        return AutoencoderDetector(kind=task.detector, random_state=task.seed, device="cpu",
                                   **dict(task.overrides))
    return make_baseline(task.detector, task.seed)


def _split(task: Task) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = _dataset(task)
    x_train, x_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, stratify=y, random_state=task.seed
    )
    if task.protocol == "clean":
        x_train, y_train = x_train[y_train == 0], y_train[y_train == 0]
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), y_train, scaler.transform(x_test), y_test


def run_task(task: Task) -> dict[str, Any]:
    """Fit one detector on one split of one dataset; return AUROC, AUPRC and timing."""
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score

    torch.set_num_threads(1)
    if task.protocol == "calibration":
        return run_calibration(task)
    x_train, _, x_test, y_test = _split(task)
    detector = _make_detector(task)
    start = time.perf_counter()
    detector.fit(x_train)
    fit_seconds = time.perf_counter() - start
    scores = np.asarray(detector.decision_function(x_test), dtype=np.float64)
    return {
        "protocol": task.protocol, "detector": task.detector, "dataset": task.dataset,
        "seed": task.seed, "auroc": float(roc_auc_score(y_test, scores)),
        "auprc": float(average_precision_score(y_test, scores)), "fit_seconds": fit_seconds,
    }


def run_calibration(task: Task) -> dict[str, Any]:
    """Fit on 80% of the training part, calibrate on the rest, measure flags on the test part."""
    from anomaly_monitor.calibration import DEFAULT_METHOD, calibrate

    x_train, _, x_test, y_test = _split(task)
    order = np.random.default_rng(task.seed).permutation(len(x_train))
    n_fit = round(len(order) * (1 - HOLDOUT_FRACTION))
    detector = _make_detector(task).fit(x_train[order[:n_fit]])
    held_out = detector.decision_function(x_train[order[n_fit:]])
    scores = detector.decision_function(x_test)
    result: dict[str, Any] = {"protocol": "calibration", "detector": task.detector,
                              "dataset": task.dataset, "seed": task.seed,
                              "anomaly_rate": float(y_test.mean())}
    for method in dict.fromkeys((DEFAULT_METHOD, "quantile")):
        threshold = calibrate(held_out, method, target_fpr=CALIBRATION_FPR).value
        flagged = scores > threshold
        hits = int((flagged & (y_test == 1)).sum())
        result[method] = {
            "flag_rate": float(flagged.mean()),
            "fpr": float(flagged[y_test == 0].mean()),
            "precision": hits / flagged.sum() if flagged.any() else float("nan"),
            "recall": hits / max(1, int(y_test.sum())),
        }
    return result


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


def _datasets(protocol: str, wanted: list[str] | None) -> list[str]:
    if protocol == "telemetry":
        from benchmarks.telemetry import FAMILIES

        names = [f.name for f in FAMILIES]
    else:
        names = [f.stem for f in adbench_files()]
    return [n for n in names if not wanted or n in wanted]


def _size(task: Task) -> float:
    if task.protocol == "telemetry":
        return float(task.dataset.split("_")[1].split("x")[0]) * 6000 * 8
    return float(next(f for f in adbench_files() if f.stem == task.dataset).stat().st_size)


def build_tasks(args: argparse.Namespace) -> list[Task]:
    """Every (protocol, detector, dataset, seed) the arguments ask for, largest first."""
    from anomaly_monitor import AutoencoderDetector

    overrides = _parse_overrides(args.set)
    tasks = []
    for protocol in args.protocols:
        for dataset in _datasets(protocol, args.datasets):
            for seed in args.seeds:
                tasks += [Task(protocol, det, dataset, seed,
                               tuple(sorted(overrides.get(det, {}).items())))
                          for det in args.detectors]
    if args.calibration:
        kind = AutoencoderDetector().kind
        tasks += [Task("calibration", kind, dataset, seed,
                       tuple(sorted(overrides.get(kind, {}).items())))
                  for dataset in _datasets("contaminated", args.datasets) for seed in args.seeds]
    # Largest datasets first so the pool does not end on one long task.
    return sorted(tasks, key=lambda t: -_size(t))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="*", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--datasets", nargs="*", help="dataset or family names (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--detectors", nargs="*", default=[*OURS, *BASELINES])
    parser.add_argument("--no-calibration", dest="calibration", action="store_false",
                        help="skip the calibration table")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--set", action="append", default=[], metavar="KIND.PARAM=JSON",
                        help="override a hyperparameter of our detectors (experiments only)")
    parser.add_argument("--output", type=Path, help="markdown file to write")
    args = parser.parse_args(argv)
    tasks = build_tasks(args)
    started = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, result in enumerate(pool.map(run_task, tasks), start=1):
            results.append(result)
            score = (f"AUROC {result['auroc']:.3f} ({result['fit_seconds']:.1f} s)"
                     if "auroc" in result else "calibrated")
            print(f"[{i}/{len(tasks)}] {result['protocol']} {result['detector']} "
                  f"{result['dataset']} seed {result['seed']}: {score}",
                  file=sys.stderr, flush=True)
    header = (f"Seeds {args.seeds}; overrides {_parse_overrides(args.set) or 'none'}; "
              f"wall time {time.perf_counter() - started:.0f} s on {args.jobs} processes "
              "of 1 torch thread\n")
    sections = [header]
    for protocol in args.protocols:
        chosen = [r for r in results if r["protocol"] == protocol]
        sections.append(render_protocol(protocol, chosen, args.detectors))
    sections.append(render_targets(results, [d for d in args.detectors if d in OURS]))
    if args.calibration:
        sections.append(render_calibration([r for r in results
                                            if r["protocol"] == "calibration"]))
    text = "\n".join(sections)
    print(text)
    default_run = (not args.datasets and not args.set and args.seeds == [0, 1, 2]
                   and args.detectors == [*OURS, *BASELINES]
                   and list(args.protocols) == list(PROTOCOLS) and args.calibration)
    output = args.output or (RESULTS / "quality.md" if default_run else None)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("# Quality benchmark (python -m benchmarks.quality)\n\n" + text,
                          encoding="utf-8")


if __name__ == "__main__":
    main()
