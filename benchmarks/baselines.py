"""The baseline detectors of the quality benchmark, behind one ``fit`` / ``decision_function``.

Every ``decision_function`` returns HIGHER = MORE ANOMALOUS (PyOD's convention);
scikit-learn's IsolationForest is flipped to match.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

BASELINES = ("IsolationForest", "PCA", "kNN", "PyOD-AutoEncoder", "PyOD-VAE")
#: PCA keeps the components explaining this share of the standardised training variance.
PCA_VARIANCE = 0.95
#: kNN scores a row by the distance to its k-th nearest training row.
KNN_NEIGHBORS = 5

Matrix = npt.NDArray[np.float64]


class IsolationForestScores:
    """scikit-learn ``IsolationForest()`` with its defaults, sign flipped."""

    def __init__(self, seed: int) -> None:
        from sklearn.ensemble import IsolationForest

        self.model = IsolationForest(random_state=seed)

    def fit(self, X: Matrix) -> IsolationForestScores:
        self.model.fit(X)
        return self

    def decision_function(self, X: Matrix) -> Matrix:
        return -self.model.decision_function(X)


class PCAReconstruction:
    """Squared reconstruction error of a PCA keeping ``PCA_VARIANCE`` of the variance."""

    def fit(self, X: Matrix) -> PCAReconstruction:
        from sklearn.decomposition import PCA

        self.model = PCA(n_components=PCA_VARIANCE, svd_solver="full").fit(X)
        return self

    def decision_function(self, X: Matrix) -> Matrix:
        rebuilt = self.model.inverse_transform(self.model.transform(X))
        return ((X - rebuilt) ** 2).sum(axis=1)


class KNNDistance:
    """Distance to the ``KNN_NEIGHBORS``-th nearest training row (PyOD's ``largest``)."""

    def fit(self, X: Matrix) -> KNNDistance:
        from sklearn.neighbors import NearestNeighbors

        self.model = NearestNeighbors(n_neighbors=KNN_NEIGHBORS).fit(X)
        return self

    def decision_function(self, X: Matrix) -> Matrix:
        distances, _ = self.model.kneighbors(X)
        return distances[:, -1]


def make_baseline(name: str, seed: int) -> Any:
    """A fresh, unfitted baseline detector by benchmark name."""
    if name == "IsolationForest":
        return IsolationForestScores(seed)
    if name == "PCA":
        return PCAReconstruction()
    if name == "kNN":
        return KNNDistance()
    if name == "PyOD-AutoEncoder":
        from pyod.models.auto_encoder import AutoEncoder

        return AutoEncoder(random_state=seed, verbose=0, device="cpu")
    if name == "PyOD-VAE":
        from pyod.models.vae import VAE

        return VAE(random_state=seed, verbose=0, device="cpu")
    raise ValueError(f"unknown detector {name!r}; choose from {', '.join(BASELINES)}")
