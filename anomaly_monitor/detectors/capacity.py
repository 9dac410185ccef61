"""Network capacity chosen from the training data: code size and hidden widths.

The code size is the data's intrinsic dimension estimated from the spectrum of
the covariance of the scaled training rows: the participation ratio
``(sum lambda)^2 / sum lambda^2`` of its eigenvalues ``lambda``, rounded up. It
counts the directions that carry the variance (it equals ``k`` for ``k``
equally strong factors under small noise) and, unlike a share-of-variance rule,
is not inflated by many weak noise directions. It is computed on a robust
subset: rows whose squared distance from the median row is above the
``1 - TRIM_FRACTION`` quantile are left out, so that a few extreme rows (or
anomalies in the history) do not add directions of their own.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

#: Share of the most outlying rows left out of the covariance the spectrum comes from.
TRIM_FRACTION = 0.05
#: Rows used to estimate the spectrum (a seeded subsample beyond this; bounded cost).
MAX_SPECTRUM_ROWS = 20_000
#: Bounds of the automatic code size.
MIN_LATENT, MAX_LATENT = 2, 64
#: Bounds of the automatic hidden widths (first and second layer).
FIRST_WIDTH = (32, 256)
SECOND_WIDTH = (16, 128)
#: Bounds of a window monitor's hidden widths: its inputs are the lags of a few
#: features, strongly correlated, so that narrower layers serve (1,000 hosts x 4
#: features x 33 lags: about 5 times fewer multiply-adds per row than the row
#: monitor's bounds would give; ``benchmarks/results/entities.md``).
WINDOW_FIRST_WIDTH = (32, 96)
WINDOW_SECOND_WIDTH = (16, 48)


def spectrum(scaled: npt.NDArray[np.floating], seed: int = 0) -> npt.NDArray[np.float64]:
    """Eigenvalues (descending) of the covariance of ``scaled`` after trimming outlying rows."""
    x = np.asarray(scaled, dtype=np.float64)
    if x.shape[0] > MAX_SPECTRUM_ROWS:
        rows = np.random.default_rng(seed).choice(x.shape[0], MAX_SPECTRUM_ROWS, replace=False)
        x = x[np.sort(rows)]
    distance = ((x - np.median(x, axis=0)) ** 2).sum(axis=1)
    keep = distance <= np.quantile(distance, 1.0 - TRIM_FRACTION)
    if keep.sum() > x.shape[1] + 1:
        x = x[keep]
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    return np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)


def intrinsic_dimension(scaled: npt.NDArray[np.floating], seed: int = 0) -> int:
    """The participation ratio of the trimmed spectrum of ``scaled``, rounded up."""
    eig = spectrum(scaled, seed)
    total = float(eig.sum())
    if total <= 0:
        return 1
    return math.ceil(total**2 / float((eig**2).sum()) - 1e-9)


def auto_architecture(
    scaled: npt.NDArray[np.floating], seed: int = 0, code_factor: float = 1.0
) -> tuple[tuple[int, ...], int]:
    """Hidden widths and code size for the scaled training rows ``scaled``.

    The code size is :func:`intrinsic_dimension` within [``MIN_LATENT``,
    ``MAX_LATENT``] (times ``code_factor``, for codes that are sparse by
    design) and below the number of features (an autoencoder with as
    many code units as inputs can copy anomalies through). The two hidden layers
    are about twice and once as wide as the input (within ``FIRST_WIDTH`` and
    ``SECOND_WIDTH``), and never narrower than the code.
    """
    n_features = scaled.shape[1]
    wanted = math.ceil(code_factor * intrinsic_dimension(scaled, seed))
    latent = min(wanted, MAX_LATENT, max(1, n_features - 1))
    latent = max(latent, min(MIN_LATENT, max(1, n_features - 1)))
    first = int(min(FIRST_WIDTH[1], max(FIRST_WIDTH[0], 2 * n_features, 2 * latent)))
    second = int(min(SECOND_WIDTH[1], max(SECOND_WIDTH[0], n_features, latent)))
    return (first, second), int(latent)


def window_widths(n_inputs: int) -> tuple[int, int]:
    """The hidden widths of a window monitor's autoencoder over ``n_inputs`` inputs:
    twice and once as wide as the input, within ``WINDOW_FIRST_WIDTH`` and
    ``WINDOW_SECOND_WIDTH`` (the code size is still chosen from the data)."""
    first = min(WINDOW_FIRST_WIDTH[1], max(WINDOW_FIRST_WIDTH[0], 2 * n_inputs))
    second = min(WINDOW_SECOND_WIDTH[1], max(WINDOW_SECOND_WIDTH[0], n_inputs))
    return first, second


def legacy_architecture(n_features: int) -> tuple[tuple[int, ...], int]:
    """The layer sizes of format-1 artifacts, fixed by the feature count alone.

    Two hidden layers about twice and once as wide as the input and a code of a
    quarter of the input (2 to 32). Only used to read models saved before the
    capacity was chosen from the data.
    """
    # Fixed numbers, not the module's bounds: format-1 shapes must never change.
    first = int(min(256, max(32, 2 * n_features)))
    second = int(min(128, max(16, n_features)))
    latent = int(min(32, max(2, math.ceil(n_features / 4))))
    return (first, second), latent
