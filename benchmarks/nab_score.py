"""The Numenta Anomaly Benchmark's scoring, reimplemented (NAB v1.1 semantics).

Every row after a file's probationary period gets a sweep score: inside a label
window, the scaled sigmoid of its relative position (1 at the window's start,
towards 0 at its end); outside, a false-positive cost, less for a row just after
a window. Flagging the rows at or above a threshold, each window is credited
with its best (earliest) detection, or costs ``fn_weight`` when it has none, and
each flagged row outside the windows adds its (negative) cost. One threshold per
detector and profile is chosen to maximise the raw score summed over every file;
the sum is normalised so that the null detector scores 0 and a perfect one 100.

    python -m benchmarks.nab_score --results DIR --detector numenta
        [--labels ../shared/datasets/nab/labels/combined_windows.json]

    python -m benchmarks.nab_score --results ../shared/datasets/nab/reference/numenta \
        --detector numenta        # Numenta HTM's published results: 66.5 / 60.1 / 71.6

``DIR/<category>/<detector>_<file>.csv`` holds ``timestamp,value,anomaly_score,label``
(NAB's result format); the labels' keys are ``<category>/<file>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.datasets import datasets_dir

#: The shared NAB label windows and the reference results.
NAB_DIR = datasets_dir() / "nab"
DEFAULT_LABELS = NAB_DIR / "labels" / "combined_windows.json"
#: NAB's probationary period: this share of a file, at most this many rows.
PROBATION_FRACTION = 0.15
PROBATION_MAX_ROWS = 750


@dataclass(frozen=True)
class Profile:
    """NAB's cost matrix of one application profile."""

    name: str
    tp_weight: float
    fp_weight: float
    fn_weight: float


PROFILES = (
    Profile("standard", 1.0, 0.11, 1.0),
    Profile("reward_low_FP_rate", 1.0, 0.22, 1.0),
    Profile("reward_low_FN_rate", 1.0, 0.11, 2.0),
)


@dataclass(frozen=True)
class Row:
    """One scored row of a file after its probationary period."""

    anomaly_score: float
    #: The row's weight if flagged, before the profile's weights: the sigmoid credit
    #: inside a window (1 at its start), the (negative) false-positive cost outside.
    sweep: float
    #: ``(file, window index)`` for a row inside a label window, else ``None``.
    window: tuple[str, int] | None


@dataclass(frozen=True)
class FileScore:
    """A file's score at one threshold."""

    name: str
    score: float
    tp: int
    fp: int
    fn: int
    tn: int


def probation_rows(n_rows: int) -> int:
    """Rows at the start of a file that are not scored."""
    return min(math.floor(PROBATION_FRACTION * n_rows), int(PROBATION_FRACTION * 5000))


def scaled_sigmoid(position: float) -> float:
    """NAB's weight of a detection at ``position`` (relative to a window's end)."""
    if position > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


#: The credit of a detection at a window's very start, before scaling.
MAX_TP = scaled_sigmoid(-1.0)


def sweep_rows(name: str, timestamps: Sequence[dt.datetime], scores: Sequence[float],
               windows: Sequence[tuple[dt.datetime, dt.datetime]]) -> list[Row]:
    """The sweep rows of one file (NAB's ``calcSweepScore``)."""
    index = {t: i for i, t in enumerate(timestamps)}
    pending = list(windows)
    probation = probation_rows(len(timestamps))
    rows: list[Row] = []
    current: int | None = None  # index of the window the rows are in
    right = width = 0
    prev_right: int | None = None
    prev_width = 0
    for i, (when, score) in enumerate(zip(timestamps, scores, strict=True)):
        if pending and when == pending[0][0]:
            _, end = pending.pop(0)
            current = len(windows) - len(pending) - 1
            right, width = index[end], index[end] - i + 1
        if current is not None:  # scaled so that a detection at the start earns 1
            sweep = scaled_sigmoid(-(right - i + 1) / width) / MAX_TP
        elif prev_right is None:
            sweep = -1.0
        else:
            sweep = scaled_sigmoid(abs(prev_right - i) / float(prev_width - 1))
        if i >= probation:
            rows.append(Row(float(score), sweep, None if current is None else (name, current)))
        if current is not None and when == windows[current][1]:
            prev_right, prev_width, current = i, width, None
    return rows


def scores_by_threshold(rows: Iterable[Row], profile: Profile) -> list[tuple[float, float]]:
    """``(threshold, raw score when flagging every row at or above it)``, thresholds
    descending (NAB's ``calcScoreByThreshold``)."""
    ordered = sorted(rows, key=lambda r: r.anomaly_score, reverse=True)
    windows = {r.window for r in ordered if r.window is not None}
    best = dict.fromkeys(windows, -profile.fn_weight)
    total = -profile.fn_weight * len(windows)
    threshold = 1.1
    out: list[tuple[float, float]] = []
    for row in ordered:
        if row.anomaly_score != threshold:
            out.append((threshold, total))
            threshold = row.anomaly_score
        if row.window is None:
            total += row.sweep * profile.fp_weight
        else:
            credit = row.sweep * profile.tp_weight
            if credit > best[row.window]:
                total += credit - best[row.window]
                best[row.window] = credit
    out.append((threshold, total))
    return out


def best_threshold(rows: Iterable[Row], profile: Profile) -> tuple[float, float]:
    """The threshold with the highest raw score over all files (the highest such
    threshold on ties, as NAB's stable sort keeps it), and that score."""
    candidates = scores_by_threshold(rows, profile)
    top = max(score for _, score in candidates)
    return next((t, s) for t, s in candidates if s == top)


def score_file(name: str, rows: Sequence[Row], threshold: float, profile: Profile) -> FileScore:
    """One file's raw score and row counts when flagging rows at or above ``threshold``."""
    windows = {r.window for r in rows if r.window is not None}
    best = dict.fromkeys(windows, -profile.fn_weight)
    total = -profile.fn_weight * len(windows)
    tp = fp = fn = tn = 0
    for row in rows:
        flagged = row.anomaly_score >= threshold
        if row.window is None:
            fp, tn = fp + flagged, tn + (not flagged)
            total += row.sweep * profile.fp_weight if flagged else 0.0
        else:
            tp, fn = tp + flagged, fn + (not flagged)
            if flagged and row.sweep * profile.tp_weight > best[row.window]:
                total += row.sweep * profile.tp_weight - best[row.window]
                best[row.window] = row.sweep * profile.tp_weight
    return FileScore(name, total, tp, fp, fn, tn)


def normalised(raw: float, n_windows: int, profile: Profile) -> float:
    """100 for a perfect detector, 0 for the null detector (never flags)."""
    null = -n_windows * profile.fn_weight
    perfect = n_windows * profile.tp_weight
    return 100.0 * (raw - null) / (perfect - null)


def parse_time(text: str) -> dt.datetime:
    """NAB's timestamps, with or without microseconds."""
    return dt.datetime.fromisoformat(text.strip())


def load_labels(path: Path) -> dict[str, list[tuple[dt.datetime, dt.datetime]]]:
    """The label windows per ``<category>/<file>.csv``."""
    data = json.loads(path.read_text())
    return {name: [(parse_time(a), parse_time(b)) for a, b in spans]
            for name, spans in data.items()}


def load_results(results: Path, detector: str,
                 labels: dict[str, list[tuple[dt.datetime, dt.datetime]]]
                 ) -> dict[str, list[Row]]:
    """Sweep rows of every result file of ``detector`` under ``results`` whose data
    file has labels."""
    files: dict[str, list[Row]] = {}
    prefix = f"{detector}_"
    for path in sorted(results.glob(f"*/{prefix}*.csv")):
        name = f"{path.parent.name}/{path.name[len(prefix):]}"
        if name not in labels:
            continue
        with path.open(newline="") as handle:
            records = list(csv.DictReader(handle))
        timestamps = [parse_time(r["timestamp"]) for r in records]
        scores = [float(r["anomaly_score"]) for r in records]
        files[name] = sweep_rows(name, timestamps, scores, labels[name])
    if not files:
        raise SystemExit(f"no result files {results}/*/{prefix}*.csv with labels")
    return files


@dataclass(frozen=True)
class ProfileResult:
    profile: Profile
    threshold: float
    raw: float
    score: float
    files: list[FileScore]


def score_detector(files: dict[str, list[Row]], n_windows: int) -> list[ProfileResult]:
    """Every profile's optimised threshold, raw and normalised score, per-file scores."""
    results = []
    for profile in PROFILES:
        threshold, raw = best_threshold((r for rows in files.values() for r in rows), profile)
        per_file = [score_file(name, rows, threshold, profile) for name, rows in files.items()]
        results.append(ProfileResult(profile, threshold, raw, normalised(raw, n_windows, profile),
                                     per_file))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--detector", required=True)
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    args = parser.parse_args(argv)
    labels = load_labels(args.labels)
    files = load_results(args.results, args.detector, labels)
    n_windows = sum(len(labels[name]) for name in files)
    print(f"{args.detector}: {len(files)} files, {n_windows} label windows")
    print("| profile | threshold | raw | score |\n|---|---:|---:|---:|")
    for result in score_detector(files, n_windows):
        print(f"| {result.profile.name} | {result.threshold:.6g} | {result.raw:.3f} | "
              f"{result.score:.1f} |")


if __name__ == "__main__":
    main()
