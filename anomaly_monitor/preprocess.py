"""Input scaling fitted at training time and stored with the model.

The scaling is part of the detector: a model version carries the centre and
scale it was trained with, so scoring applies exactly the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from anomaly_monitor.hyperparameters import SCALING_METHODS

ScalingMethod = Literal["standard", "robust", "none"]

#: Scaled values are clipped to this magnitude so that a huge raw value gives a
#: huge but finite float32 score instead of infinity.
SCALED_CLIP = 1.0e6
#: A feature whose spread is below this is treated as constant (scale 1).
MIN_SCALE = 1.0e-12
#: The robust scale is the interquartile range divided by this (the IQR of a unit normal).
IQR_OF_NORMAL = 1.3489795003921634


@dataclass(frozen=True)
class Scaler:
    """A per-feature affine transform ``(x - center) / scale``.

    ``standard`` uses mean and standard deviation; ``robust`` uses the median
    and the interquartile range (rescaled to match the standard deviation of a
    normal distribution), falling back to the standard deviation for features
    whose IQR is zero; ``none`` leaves values as they are.
    """

    method: str
    center: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]

    @classmethod
    def fit(cls, X: npt.NDArray[np.float64], method: str = "standard") -> Scaler:
        """Fit the transform on the training matrix ``X`` (rows x features)."""
        if method not in SCALING_METHODS:
            raise ValueError(f"scaling must be one of {SCALING_METHODS}, got {method!r}")
        n_features = X.shape[1]
        if method == "none":
            return cls(method, np.zeros(n_features), np.ones(n_features))
        std = X.std(axis=0)
        if method == "standard":
            center, scale = X.mean(axis=0), std
        else:
            q1, center, q3 = np.percentile(X, [25.0, 50.0, 75.0], axis=0)
            scale = (q3 - q1) / IQR_OF_NORMAL
            scale = np.where(scale > MIN_SCALE, scale, std)
        scale = np.where(scale > MIN_SCALE, scale, 1.0)
        return cls(method, center.astype(np.float64), scale.astype(np.float64))

    def transform(self, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        """Scale ``X`` and return float32, clipped to +-``SCALED_CLIP``.

        The arithmetic is float64 (a raw value like an epoch timestamp keeps its
        precision) and runs on torch's CPU threads; only the result is float32.
        """
        x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
        center = torch.from_numpy(self.center)
        scale = torch.from_numpy(self.scale)
        scaled = x.sub(center).div_(scale).clamp_(-SCALED_CLIP, SCALED_CLIP)
        return scaled.to(torch.float32).numpy()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (floats round-trip exactly through JSON)."""
        return {
            "method": self.method,
            "center": [float(v) for v in self.center],
            "scale": [float(v) for v in self.scale],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], n_features: int) -> Scaler:
        """Rebuild from :meth:`to_dict`, checking the method and the lengths."""
        method = state.get("method")
        if method not in SCALING_METHODS:
            raise ValueError(f"unknown scaling method {method!r}")
        center = np.asarray(state.get("center"), dtype=np.float64)
        scale = np.asarray(state.get("scale"), dtype=np.float64)
        if center.shape != (n_features,) or scale.shape != (n_features,):
            raise ValueError(
                f"scaling state has {center.shape}/{scale.shape} values for {n_features} features"
            )
        if not (np.isfinite(center).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("scaling state has non-finite or non-positive values")
        return cls(method, center, scale)
