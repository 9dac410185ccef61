"""The two terms of the autoencoder's score and the gamma nulls that put them on one scale.

Pure tensor and array functions: the reconstruction term comes from per-feature
errors, the code term is a whitened (Mahalanobis) distance in code space, and
each is standardised by the Wilson-Hilferty deviate of a gamma distribution
matched to its moments on typical training rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from torch import Tensor

#: Bounds of a term's gamma shape: above the top it is a point mass (zero variance);
#: below the bottom the Wilson-Hilferty tail approximation breaks down.
MIN_GAMMA_SHAPE, MAX_GAMMA_SHAPE = 0.25, 1.0e6
#: Ridge added to the code covariance, relative to its mean variance.
LATENT_RIDGE = 1.0e-3


class BatchTerms(NamedTuple):
    """The score's ingredients for one batch of rows (ensemble means)."""

    errors: Tensor
    kl: Tensor
    code_term: Tensor
    codes: list[Tensor]


def gamma_moments(values: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Mean and shape of the gamma distribution with the moments of ``values``."""
    mean = max(float(values.mean()), 1e-12)
    var = float(values.var())
    return mean, min(mean * mean / var, MAX_GAMMA_SHAPE) if var > 0 else MAX_GAMMA_SHAPE


def _wilson_hilferty(stats: Tensor | npt.NDArray[np.floating]) -> tuple[float, float, float]:
    """Mean, centre and spread of the cube-root normal approximation of a gamma null."""
    mean = float(stats[0])
    shape = min(max(float(stats[1]), MIN_GAMMA_SHAPE), MAX_GAMMA_SHAPE)
    spread = (1.0 / (9.0 * shape)) ** 0.5
    return mean, 1.0 - spread * spread, spread


def gamma_z(values: Tensor, stats: Tensor | npt.NDArray[np.floating]) -> Tensor:
    """The normal deviate of ``values`` under a gamma null with ``stats = (mean, shape)``.

    The Wilson-Hilferty approximation: the cube root of a gamma variable is close
    to normal, accurately and finitely far into the tail.
    """
    mean, centre, spread = _wilson_hilferty(stats)
    return ((values.clamp_min(0.0) / mean).pow(1.0 / 3.0) - centre) / spread


def gamma_value(z: Tensor, stats: Tensor | npt.NDArray[np.floating]) -> Tensor:
    """The inverse of :func:`gamma_z`: the value with normal deviate ``z``."""
    mean, centre, spread = _wilson_hilferty(stats)
    return mean * (centre + spread * z).clamp_min(0.0).pow(3.0)


def code_term_of(codes: Tensor, center: Tensor, whitening: Tensor) -> Tensor:
    """Each code's squared Mahalanobis distance from ``center`` per code dimension
    (``whitening`` from :func:`latent_statistics`): about 1 for a typical code."""
    return ((codes - center) @ whitening.T).pow(2).mean(dim=1)


def latent_statistics(
    codes: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Mean and whitening matrix ``W`` of training codes: ``W @ (z - mean)`` has unit covariance.

    The covariance gets a small ridge so that collapsed code dimensions stay invertible.
    """
    center = codes.mean(axis=0)
    if codes.shape[0] > 1:
        cov = np.atleast_2d(np.cov(codes, rowvar=False))
    else:
        cov = np.eye(codes.shape[1])
    ridge = LATENT_RIDGE * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    chol = np.linalg.cholesky(cov + ridge * np.eye(cov.shape[0]))
    whitening = np.linalg.solve(chol, np.eye(cov.shape[0]))
    return center.astype(np.float32), whitening.astype(np.float32)
