"""A fitted detector's state as JSON fields and named tensors, and back.

:class:`FittedStateMixin` gives the estimator :meth:`~FittedStateMixin.export_state`
and :meth:`~FittedStateMixin.from_state`; :mod:`~anomaly_monitor.detectors.artifact`
turns that state into bytes (safetensors + manifest) and checks hashes and headers.
The estimator restores itself: nothing outside it sets its fitted attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from anomaly_monitor.detectors.training import TrainingHistory
from anomaly_monitor.preprocess import Scaler

if TYPE_CHECKING:
    from anomaly_monitor.detectors.estimator import AutoencoderDetector

D = TypeVar("D", bound="AutoencoderDetector")

#: Names of the fitted state's code statistics among its tensors.
LATENT_CENTER = "latent.center"
LATENT_WHITENING = "latent.whitening"
#: safetensors dtype names of the tensors a fitted state may hold.
DTYPE_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16"}


def _checked_term_gamma(value: Any) -> npt.NDArray[np.float32] | None:
    """The score terms' gamma nulls, validated (``None``: an older model that scores
    additively)."""
    if value is None:
        return None
    stats = np.asarray(value, dtype=np.float32)
    if stats.shape != (2, 2) or not (np.isfinite(stats).all() and (stats > 0).all()):
        raise ValueError("the term_gamma is malformed")
    return stats


class FittedStateMixin:
    """Export and restore of :class:`AutoencoderDetector`'s fitted attributes."""

    def export_state(self: AutoencoderDetector) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The fitted state: JSON-serialisable fields and named CPU tensors (what
        :mod:`~anomaly_monitor.detectors.artifact` writes; no hyperparameters)."""
        self._check_fitted()
        tensors = {
            f"{i}.{name}": t.detach().to("cpu").contiguous()
            for i, module in enumerate(self.modules_)
            for name, t in module.state_dict().items()
        }
        tensors[LATENT_CENTER] = torch.from_numpy(np.ascontiguousarray(self.latent_center_))
        tensors[LATENT_WHITENING] = torch.from_numpy(
            np.ascontiguousarray(self.latent_whitening_))
        state = {
            "architecture": {"hidden_dims": [int(h) for h in self.hidden_dims_],
                             "latent_dim": int(self.latent_dim_)},
            "n_features": self.n_features_in_,
            "feature_names": self.feature_names_in_,
            "scaling": self.scaler_.to_dict(),
            "error_scale": [float(v) for v in self.error_scale_],
            "term_gamma": (None if self.term_gamma_ is None
                           else [[float(v) for v in row] for row in self.term_gamma_]),
            "training": [h.to_dict() for h in self.history_],
        }
        return state, tensors

    def tensor_specs(self: AutoencoderDetector, n_features: int) -> dict[str, dict[str, Any]]:
        """Name -> shape and dtype of every tensor of a fitted state with these
        hyperparameters and ``hidden_dims_``/``latent_dim_`` (built on the meta device:
        nothing is allocated, so a forged size costs nothing)."""
        with torch.device("meta"):
            modules = [self.build_module(n_features) for _ in range(self.n_estimators)]
        specs = {
            f"{i}.{name}": {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
            for i, module in enumerate(modules)
            for name, t in module.state_dict().items()
        }
        code = self.latent_dim_
        specs[LATENT_CENTER] = {"shape": [self.n_estimators, code], "dtype": "F32"}
        specs[LATENT_WHITENING] = {"shape": [self.n_estimators, code, code], "dtype": "F32"}
        return specs

    @classmethod
    def from_state(
        cls: type[D], params: dict[str, Any], state: dict[str, Any],
        load_tensors: Callable[[dict[str, dict[str, Any]]], dict[str, Tensor]],
    ) -> D:
        """A fitted detector from hyperparameters and an :meth:`export_state` state.

        ``load_tensors(specs)`` returns the named tensors after checking that they
        have the shapes ``specs`` expects (it is called before anything is sized
        from them). Raises ``ValueError``, ``KeyError`` or ``TypeError`` for a
        malformed state.
        """
        detector = cls(**params)
        detector.validate_params()
        n_features = int(state["n_features"])
        hidden = tuple(int(h) for h in state["architecture"]["hidden_dims"])
        latent = int(state["architecture"]["latent_dim"])
        if n_features < 1 or any(h < 1 for h in hidden) or latent < 1:
            raise ValueError(f"the layer sizes are invalid: {n_features}, {hidden}, {latent}")
        detector.hidden_dims_, detector.latent_dim_ = hidden, latent
        tensors = load_tensors(detector.tensor_specs(n_features))
        detector.n_features_in_ = n_features
        names = state.get("feature_names")
        detector.feature_names_in_ = None if names is None else [str(n) for n in names]
        detector.scaler_ = Scaler.from_dict(state["scaling"], n_features)
        error_scale = np.asarray(state["error_scale"], dtype=np.float64)
        if error_scale.shape != (n_features,) or not (error_scale > 0).all():
            raise ValueError("the error_scale is malformed")
        detector.error_scale_ = error_scale
        detector.term_gamma_ = _checked_term_gamma(state.get("term_gamma"))
        detector.device_ = detector.resolve_device()
        detector.modules_ = []
        for i in range(detector.n_estimators):
            module = detector.build_module(n_features)
            prefix = f"{i}."
            module.load_state_dict(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                strict=True)
            detector.modules_.append(module.to(detector.device_).eval())
        detector.latent_center_ = tensors[LATENT_CENTER].numpy()
        detector.latent_whitening_ = tensors[LATENT_WHITENING].numpy()
        detector.history_ = [TrainingHistory() for _ in range(detector.n_estimators)]
        return detector
