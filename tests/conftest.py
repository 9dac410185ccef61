"""Shared fixtures: seeded synthetic data whose anomalies break feature correlations."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    # Two cores on CI: keep torch from oversubscribing them.
    torch.set_num_threads(2)


def correlated_data(
    n_normal: int = 2000, n_anomalies: int = 100, n_features: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal rows on a 2-D linear manifold plus noise, and anomalies with the
    same per-feature distributions but the correlations broken (each feature
    drawn from a different normal row)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(2, n_features))

    def normal(n: int) -> np.ndarray:
        return rng.normal(size=(n, 2)) @ mixing + 0.1 * rng.normal(size=(n, n_features))

    train = normal(n_normal)
    test_normal = normal(n_anomalies * 4)
    pool = normal(n_anomalies * n_features)
    anomalies = np.stack(
        [pool[rng.integers(0, len(pool), n_anomalies), j] for j in range(n_features)], axis=1
    )
    x_test = np.vstack([test_normal, anomalies])
    y_test = np.r_[np.zeros(len(test_normal)), np.ones(n_anomalies)]
    return train, x_test, y_test


@pytest.fixture(scope="session")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return correlated_data()
