"""Locating and loading the shared ADBench datasets (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
#: Where the shared datasets live unless ``ANOMALY_MONITOR_DATASETS`` says otherwise.
DEFAULT_DATASETS = REPO.parent / "shared" / "datasets"


def datasets_dir() -> Path:
    """The shared datasets directory (``$ANOMALY_MONITOR_DATASETS`` or ``../shared/datasets``)."""
    return Path(os.environ.get("ANOMALY_MONITOR_DATASETS", DEFAULT_DATASETS))


def adbench_files() -> list[Path]:
    """Every ADBench ``.npz`` file, ordered by its ADBench number."""
    files = sorted((datasets_dir() / "adbench").glob("*.npz"),
                   key=lambda p: int(p.stem.split("_", 1)[0]))
    if not files:
        raise FileNotFoundError(f"no ADBench .npz files under {datasets_dir() / 'adbench'}")
    return files


def load_adbench(path: Path) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """``X`` and ``y`` (1 = anomaly) of one ADBench file, without unpickling."""
    with np.load(path, allow_pickle=False) as data:
        return data["X"].astype(np.float64), data["y"].astype(np.int64)
