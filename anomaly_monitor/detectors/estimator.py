"""``AutoencoderDetector``: the estimator wrapper around the autoencoder modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from anomaly_monitor.detectors.autoencoder import DenoisingAutoencoder
from anomaly_monitor.detectors.base import (
    MIN_FIT_ROWS,
    BaseDetector,
    NotFittedError,
    check_matrix,
)
from anomaly_monitor.detectors.capacity import auto_architecture
from anomaly_monitor.detectors.cuda_memory import (
    MIN_FIT_BATCH_ROWS,
    MIN_SCORE_BATCH_ROWS,
    OomCounts,
    is_cuda_oom,
    release_cached,
)
from anomaly_monitor.detectors.progress import FitProgress
from anomaly_monitor.detectors.sparse import SparseAutoencoder
from anomaly_monitor.detectors.state import FittedStateMixin
from anomaly_monitor.detectors.terms import (
    BatchTerms,
    code_term_of,
    gamma_moments,
    gamma_value,
    gamma_z,
    latent_statistics,
)
from anomaly_monitor.detectors.training import TrainingConfig, TrainingHistory, train_module
from anomaly_monitor.detectors.vae import VariationalAutoencoder
from anomaly_monitor.hyperparameters import (
    ACTIVATIONS,
    DEVICES,
    KINDS,
    NOISE_TYPES,
    SCALING_METHODS,
    SCORE_TYPES,
)
from anomaly_monitor.preprocess import Scaler

T = TypeVar("T")


#: Rows per forward pass when scoring (bounded memory: about 64k x features x 4 bytes).
SCORE_BATCH_ROWS = 65536
#: Per-feature error scales are floored at this fraction of their mean, so that a
#: feature the model reconstructs perfectly on training data cannot dominate scores.
ERROR_SCALE_FLOOR = 1.0e-2
#: Share of the worst-reconstructed training rows left out of the error scales and the
#: code statistics (robustness to anomalies in the training data).
STATISTICS_TRIM = 0.1
#: Training rows (a seeded subsample beyond this) the error scales and code statistics
#: are computed on: bounded memory on large tables.
MAX_STATISTICS_ROWS = 200_000
#: The sparse autoencoder's code is this many times the intrinsic dimension: only a
#: ``sparsity_target`` share of its units is active for a row, so it must be wider.
SPARSE_CODE_FACTOR = 2.0


def _is_positive_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def _floored(means: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``means`` floored at ``ERROR_SCALE_FLOOR`` times their average (and above zero)."""
    return np.maximum(means, max(float(means.mean()) * ERROR_SCALE_FLOOR, 1e-12))


class AutoencoderDetector(FittedStateMixin, BaseDetector):
    """Anomaly detector scoring rows by the reconstruction error of an autoencoder.

    Scores follow PyOD's convention: **higher means more anomalous**. Two terms
    are computed for each row, as means over ``n_estimators`` networks trained
    from different seeds and validation splits:

    - the *reconstruction term*: the mean over features of the squared
      reconstruction error in the scaled space, each feature's error divided by
      that feature's mean error on typical training rows (``normalize_errors``);
    - the *code term*: the squared Mahalanobis distance of the row's code from
      the typical training codes, divided by the code size. It catches rows that
      lie on the learned manifold but far out along it, which an autoencoder
      reconstructs well.

    Each term is standardised by a gamma distribution matched to its mean and
    variance on the typical training rows (those below the 90th percentile of
    reconstruction error): the Wilson-Hilferty deviate ``z`` (the cube root of
    a gamma variable is close to normal). The score is the larger of the two
    deviates (the code's times ``latent_weight``), mapped back onto the
    reconstruction term's own scale: where reconstruction wins, the score *is*
    the reconstruction term (about 1 on typical training rows). Taking the
    maximum of standardised terms, rather than adding raw ones, keeps the normal
    spread of one term from drowning a clear excess of the other: a row that
    breaks the correlations between sensors is flagged by its reconstruction, a
    row far out along the manifold by its code. The gamma fits only put the
    terms on one scale; they are not calibrated tail probabilities (the
    reconstruction null is fitted below its own 90th percentile, so the maximum
    leans towards reconstruction). Flagging rates come from the threshold
    methods of :mod:`anomaly_monitor.calibration`.

    Capacity comes from the data (:mod:`anomaly_monitor.detectors.capacity`):
    the code size is the intrinsic dimension of the scaled training rows (the
    participation ratio of their covariance spectrum, after leaving out the most
    outlying rows), twice that for ``sae`` (a sparse code must be wider), within
    [2, 64] and below the feature count; recorded in ``latent_dim_`` and
    ``hidden_dims_``.

    Robustness to anomalies in the training rows (history is never clean): each
    mini-batch's worst-reconstructed ``trim_fraction`` rows are left out of the
    loss, and the error scales, code statistics and the terms' gamma fits use
    only the typical 90% of training rows.

    Parameters
    ----------
    kind : {"vae", "dae", "sae"}
        Variational, denoising or sparse autoencoder.
    hidden_dims, latent_dim : sizes of the hidden layers and of the code;
        ``None`` chooses them from the training data (:func:`auto_architecture`);
        an explicit value wins.
    activation : hidden activation, one of ``relu, elu, tanh, leaky_relu, silu``.
    n_estimators : networks in the ensemble (different seeds and validation splits).
    epochs, batch_size, learning_rate, weight_decay : Adam training settings.
    max_steps : optimizer steps per network at most: on large tables training
        ends after this many mini-batches even if early stopping has not (bounds
        the fit time; 6,000 steps of 128 rows see the 90,000 training rows of a
        100k-row table 8.5 times).
    validation_fraction, patience : held-out fraction for early stopping and the
        number of epochs without improvement before stopping; ``0`` disables it.
    trim_fraction : share of the worst-reconstructed rows of each mini-batch left
        out of the loss, for robustness to anomalies in the training data.
    scaling : ``standard``, ``robust`` (median / IQR) or ``none``.
    normalize_errors : divide each feature's error by its mean over the typical
        90% of training rows.
    noise, noise_level : corruption of the denoising autoencoder
        (``gaussian`` standard deviation or ``masking`` fraction).
    beta : weight of the KL term of the VAE.
    sparsity_target, sparsity_weight : target mean activation of the sparse
        autoencoder's code units and the weight of its KL sparsity penalty.
    score_type : ``reconstruction`` (the VAE decodes its latent mean), ``elbo``
        (VAE only: adds ``beta`` * KL) or ``mc`` (VAE only: squared error averaged
        over ``mc_samples`` posterior samples drawn from a generator seeded with
        ``random_state``, so repeated calls on the same rows agree).
    latent_weight : factor on the code term's standardised deviate before the
        maximum (0 scores by reconstruction alone).
    random_state : seed of initialisation, splits, shuffling and noise.
    device : ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    verbose : show a tqdm progress bar during ``fit``; without it, progress is logged
        at INFO (logger ``anomaly_monitor.training``) every 10 s.
    """

    def __init__(
        self,
        kind: str = "vae",
        *,
        hidden_dims: Sequence[int] | None = None,
        latent_dim: int | None = None,
        activation: str = "relu",
        n_estimators: int = 3,
        epochs: int = 100,
        max_steps: int = 6_000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        validation_fraction: float = 0.1,
        patience: int = 10,
        trim_fraction: float = 0.05,
        scaling: str = "standard",
        normalize_errors: bool = True,
        noise: str = "gaussian",
        noise_level: float = 0.1,
        beta: float = 0.1,
        sparsity_target: float = 0.05,
        sparsity_weight: float = 0.1,
        score_type: str = "reconstruction",
        mc_samples: int = 16,
        latent_weight: float = 1.0,
        random_state: int = 0,
        device: str = "auto",
        verbose: bool = False,
    ) -> None:
        self.kind = kind
        self.hidden_dims = hidden_dims
        self.latent_dim = latent_dim
        self.activation = activation
        self.n_estimators = n_estimators
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.trim_fraction = trim_fraction
        self.scaling = scaling
        self.normalize_errors = normalize_errors
        self.noise = noise
        self.noise_level = noise_level
        self.beta = beta
        self.sparsity_target = sparsity_target
        self.sparsity_weight = sparsity_weight
        self.score_type = score_type
        self.mc_samples = mc_samples
        self.latent_weight = latent_weight
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # -- validation -----------------------------------------------------------------

    def validate_params(self) -> None:
        """Raise ``ValueError`` naming the first hyperparameter that is out of range or
        of the wrong type (``fit`` calls it; so does ``anomaly-monitor check``)."""
        choices = {
            "kind": (self.kind, KINDS),
            "activation": (self.activation, ACTIVATIONS),
            "scaling": (self.scaling, SCALING_METHODS),
            "noise": (self.noise, NOISE_TYPES),
            "score_type": (self.score_type, SCORE_TYPES),
            "device": (self.device, DEVICES),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if self.score_type != "reconstruction" and self.kind != "vae":
            raise ValueError(
                f"score_type={self.score_type!r} needs kind='vae'; got kind={self.kind!r}"
            )
        positive_ints = ("n_estimators", "epochs", "max_steps", "batch_size", "patience",
                         "mc_samples")
        for name in positive_ints:
            if not _is_positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        self._validate_sizes()
        reals = ("validation_fraction", "trim_fraction", "noise_level", "sparsity_target",
                 "learning_rate", "beta", "weight_decay", "sparsity_weight", "latent_weight")
        for name in reals:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"{name} must be a number; got {value!r}")
        ranges = {
            "validation_fraction": (self.validation_fraction, 0.0, 0.5),
            "trim_fraction": (self.trim_fraction, 0.0, 0.5),
            "noise_level": (self.noise_level, 0.0, 1.0 if self.noise == "masking" else 10.0),
            "sparsity_target": (self.sparsity_target, 1e-6, 1.0 - 1e-6),
        }
        for name, (value, low, high) in ranges.items():
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}]; got {value!r}")
        for name in ("learning_rate", "beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)!r}")
        for name in ("weight_decay", "sparsity_weight", "latent_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative; got {getattr(self, name)!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but no CUDA device is available")

    def _validate_sizes(self) -> None:
        if self.latent_dim is not None and not _is_positive_int(self.latent_dim):
            raise ValueError(f"latent_dim must be a positive integer or None; "
                             f"got {self.latent_dim!r}")
        if self.hidden_dims is not None and (
                isinstance(self.hidden_dims, str | bytes)
                or not all(_is_positive_int(h) for h in self.hidden_dims)):
            raise ValueError(f"hidden_dims must be a list of positive integers or None; "
                             f"got {self.hidden_dims!r}")

    def _architecture(self, scaled: npt.NDArray[np.floating]) -> tuple[tuple[int, ...], int]:
        """Hidden widths and code size: the explicit ones, else chosen from ``scaled``."""
        if self.hidden_dims is None or self.latent_dim is None:
            factor = SPARSE_CODE_FACTOR if self.kind == "sae" else 1.0
            auto_hidden, auto_latent = auto_architecture(scaled, self.random_state, factor)
        hidden = (auto_hidden if self.hidden_dims is None
                  else tuple(int(h) for h in self.hidden_dims))
        latent = auto_latent if self.latent_dim is None else int(self.latent_dim)
        if any(h < 1 for h in hidden) or latent < 1:
            raise ValueError(f"layer sizes must be positive; got {hidden} and {latent}")
        return hidden, latent

    def resolve_device(self) -> torch.device:
        """The torch device ``device`` names (``auto``: CUDA when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def build_module(self, n_features: int) -> nn.Module:
        """A freshly initialised network of this detector's kind and fitted size."""
        hidden, latent = self.hidden_dims_, self.latent_dim_
        if self.kind == "vae":
            return VariationalAutoencoder(n_features, hidden, latent, self.activation, self.beta)
        if self.kind == "dae":
            return DenoisingAutoencoder(
                n_features, hidden, latent, self.activation, self.noise, self.noise_level
            )
        return SparseAutoencoder(
            n_features, hidden, latent, self.activation,
            self.sparsity_target, self.sparsity_weight,
        )

    # -- fitting --------------------------------------------------------------------

    def fit(self, X: Any, y: object = None) -> AutoencoderDetector:
        """Fit the scaling and train the ensemble on unlabelled rows ``X``.

        ``X`` is an ndarray or DataFrame (rows x features) without NaN or
        infinity; ``y`` is ignored. Returns ``self``.
        """
        self.validate_params()
        array, names = check_matrix(X, min_rows=MIN_FIT_ROWS)
        self.n_features_in_ = array.shape[1]
        self.feature_names_in_ = names
        self.scaler_ = Scaler.fit(array, self.scaling)
        self.device_ = self.resolve_device()
        self.cuda_oom_ = OomCounts()
        scaled_rows = self.scaler_.transform(array)
        self.hidden_dims_, self.latent_dim_ = self._architecture(scaled_rows)
        scaled = torch.from_numpy(scaled_rows).to(self.device_)
        seeds = np.random.SeedSequence(self.random_state).generate_state(self.n_estimators)
        config = TrainingConfig(
            self.epochs, self.batch_size, self.learning_rate, self.weight_decay,
            self.patience, self.trim_fraction, self.max_steps,
        )
        self.modules_: list[nn.Module] = []
        self.history_: list[TrainingHistory] = []
        description = f"fit {self.kind} ({self.n_estimators} x up to {self.epochs} epochs)"
        with FitProgress(self.epochs * self.n_estimators, description,
                         bar=self.verbose) as progress:
            for seed in (int(s) for s in seeds):
                while True:
                    try:
                        module, history = self._fit_one(scaled, config, seed, progress)
                        break
                    except Exception as exc:  # CUDA out of memory: smaller steps, then CPU
                        if not is_cuda_oom(exc):
                            raise
                        config = dataclasses.replace(config, batch_size=self._after_oom(
                            config.batch_size, MIN_FIT_BATCH_ROWS, exc))
                        scaled = scaled.to(self.device_)
                self.modules_.append(module)
                self.history_.append(history)
        self._fit_statistics(array)
        return self

    def oom_counts(self) -> OomCounts:
        """The CUDA out-of-memory events this detector handled (batches halved, moves
        to the CPU) since it was fitted or loaded."""
        return self.__dict__.setdefault("cuda_oom_", OomCounts())

    def _fit_statistics(self, array: npt.NDArray[np.float64]) -> None:
        """Error scales, code statistics and the two terms' null fits, from typical rows.

        The rows whose (mean-normalised) reconstruction error is in the top
        ``STATISTICS_TRIM`` are left out, so that anomalies in the training data
        neither inflate the error scale of the features they break, nor widen the
        code distribution, nor stretch the terms' fitted null distributions.
        """
        if array.shape[0] > MAX_STATISTICS_ROWS:
            rng = np.random.default_rng(self.random_state)
            array = array[np.sort(rng.choice(array.shape[0], MAX_STATISTICS_ROWS, replace=False))]
        self.latent_center_ = self.latent_whitening_ = self.term_gamma_ = None
        parts = self._map_batches(array, lambda t: (
            t.errors.cpu().numpy(), t.kl.cpu().numpy(), [c.cpu().numpy() for c in t.codes]))
        errors = np.concatenate([part[0] for part in parts]).astype(np.float64)
        kl = np.concatenate([part[1] for part in parts]).astype(np.float64)
        codes = [np.concatenate([part[2][i] for part in parts]).astype(np.float64)
                 for i in range(len(self.modules_))]
        rows = (errors / _floored(errors.mean(axis=0))).mean(axis=1)
        typical = rows <= np.quantile(rows, 1.0 - STATISTICS_TRIM)
        means = errors[typical].mean(axis=0)
        self.error_scale_ = _floored(means) if self.normalize_errors else np.ones_like(means)
        stats = [latent_statistics(c[typical]) for c in codes]
        self.latent_center_ = np.stack([center for center, _ in stats])
        self.latent_whitening_ = np.stack([whitening for _, whitening in stats])
        recon = (errors[typical] / self.error_scale_).mean(axis=1) + kl[typical]
        code_term = np.mean([
            code_term_of(torch.from_numpy(c[typical]), torch.from_numpy(center.astype(np.float64)),
                         torch.from_numpy(whitening.astype(np.float64))).numpy()
            for c, center, whitening in zip(codes, self.latent_center_,
                                            self.latent_whitening_, strict=True)
        ], axis=0)
        self.term_gamma_ = np.array([gamma_moments(recon), gamma_moments(code_term)],
                                    dtype=np.float32)

    def _fit_one(
        self, scaled: Tensor, config: TrainingConfig, seed: int, progress: FitProgress
    ) -> tuple[nn.Module, TrainingHistory]:
        n_rows = scaled.shape[0]
        order = torch.from_numpy(np.random.default_rng(seed).permutation(n_rows))
        n_val = round(self.validation_fraction * n_rows) if self.validation_fraction else 0
        n_val = min(n_val, n_rows - 2)
        val_index, train_index = order[:n_val], order[n_val:]
        with torch.random.fork_rng(devices=[] if scaled.device.type == "cpu" else [scaled.device]):
            torch.manual_seed(seed)
            module = self.build_module(scaled.shape[1]).to(self.device_)
        x_val = scaled[val_index.to(scaled.device)] if n_val > 0 else None
        history = train_module(
            module, scaled[train_index.to(scaled.device)], x_val, config, seed, progress
        )
        return module, history

    # -- scoring --------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "modules_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X) before scoring"
            )

    def _check_input(self, X: Any) -> npt.NDArray[np.float64]:
        self._check_fitted()
        array, names = check_matrix(X)
        if array.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {array.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input"
            )
        fitted_names = self.feature_names_in_
        if names is not None and fitted_names is not None and names != fitted_names:
            raise ValueError(
                f"X has columns {names} but the detector was fitted with "
                f"{fitted_names} (same names, same order)"
            )
        return array

    def _latent_tensors(self) -> list[tuple[Tensor, Tensor]] | None:
        """Per-network code centre and whitening on the device; ``None`` when unused."""
        if self.latent_weight == 0 or getattr(self, "latent_center_", None) is None:
            return None
        return [
            (torch.as_tensor(center, device=self.device_),
             torch.as_tensor(whitening, device=self.device_))
            for center, whitening in zip(self.latent_center_, self.latent_whitening_, strict=True)
        ]

    def _batch_terms(self, x: Tensor, latent: list[tuple[Tensor, Tensor]] | None) -> BatchTerms:
        """Ensemble means for one batch: per-feature squared errors, the ``elbo`` KL term
        (per feature), the code term (mean squared whitened code), and each network's code."""
        errors = torch.zeros_like(x)
        kl = x.new_zeros(x.shape[0])
        code_term = x.new_zeros(x.shape[0])
        codes = []
        for i, module in enumerate(self.modules_):
            if self.score_type == "elbo":
                code, logvar = module.encode(x)
                reconstruction = module.decoder(code)
                kl += module.beta * module.kl_divergence(code, logvar) / x.shape[1]
            else:
                reconstruction, code = module.forward_with_code(x)
            codes.append(code)
            if self.score_type == "mc":
                generator = torch.Generator(device=x.device).manual_seed(self.random_state + i)
                errors += module.mc_feature_errors(x, self.mc_samples, generator)
            else:
                errors += (reconstruction - x) ** 2
            if latent is not None:
                code_term += code_term_of(code, *latent[i])
        n = len(self.modules_)
        return BatchTerms(errors / n, kl / n, code_term / n, codes)

    def _map_batches(
        self, array: npt.NDArray[np.float64], reduce: Callable[[BatchTerms], T]
    ) -> list[T]:
        """Scale ``array`` and run ``reduce(terms)`` on each batch of rows."""
        latent = self._latent_tensors()
        parts = []
        rows, start = SCORE_BATCH_ROWS, 0
        with torch.inference_mode():
            while start < array.shape[0]:
                chunk = array[start:start + rows]
                try:
                    x = torch.from_numpy(self.scaler_.transform(chunk)).to(self.device_)
                    parts.append(reduce(self._batch_terms(x, latent)))
                except Exception as exc:
                    if not is_cuda_oom(exc):
                        raise
                    rows = self._after_oom(rows, MIN_SCORE_BATCH_ROWS, exc)
                    latent = self._latent_tensors()
                    continue
                start += len(chunk)
        return parts

    def _after_oom(self, rows: int, minimum: int, exc: BaseException) -> int:
        """After CUDA ran out of memory with ``rows`` per step: half as many, or (below
        ``minimum``) the same on the CPU, where the detector then stays (``exc`` again
        when it is on the CPU already)."""
        release_cached()
        counts = self.oom_counts()
        if rows // 2 >= minimum:
            counts.halved += 1
            return rows // 2
        if self.device_.type == "cpu":
            raise exc
        counts.cpu += 1
        self.device_ = torch.device("cpu")
        for module in getattr(self, "modules_", []):
            module.to(self.device_)
        return rows

    def _feature_weights(self) -> Tensor:
        """Per-feature factor turning squared errors into reconstruction-term shares."""
        weights = 1.0 / (np.asarray(self.error_scale_) * self.n_features_in_)
        return torch.as_tensor(weights, dtype=torch.float32, device=self.device_)

    def _batch_scores(self, terms: BatchTerms, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Per-feature reconstruction contributions and the row scores of one batch."""
        contributions = terms.errors * weights
        recon = contributions.sum(dim=1) + terms.kl
        stats = getattr(self, "term_gamma_", None)
        if stats is None:  # models saved before the fused score: the additive one
            return contributions, recon + self.latent_weight * terms.code_term
        if self.latent_weight == 0:
            return contributions, recon
        # The larger standardised excess of the two terms, expressed on the reconstruction
        # term's scale (where the reconstruction term wins, the score is that term itself).
        z = torch.maximum(gamma_z(recon, stats[0]),
                          self.latent_weight * gamma_z(terms.code_term, stats[1]))
        score = gamma_value(z, stats[0])
        return contributions, score

    def _batch_contributions(self, terms: BatchTerms, weights: Tensor) -> Tensor:
        contributions, score = self._batch_scores(terms, weights)
        # The score is spread over features in proportion to their reconstruction share.
        recon = contributions.sum(dim=1, keepdim=True)
        uniform = torch.full_like(contributions, 1.0 / self.n_features_in_)
        share = torch.where(recon > 0, contributions / recon.clamp_min(1e-30), uniform)
        return share * score[:, None]

    def decision_function(self, X: Any) -> npt.NDArray[np.float64]:
        """Anomaly score of each row of ``X``: HIGHER = MORE ANOMALOUS.

        The score is the larger standardised excess (see the class docstring) of the
        row's normalised reconstruction error and of its code's distance from the
        training codes, on the reconstruction error's scale. It is deterministic: the
        same fitted model gives the same scores for the same rows.
        """
        array = self._check_input(X)
        weights = self._feature_weights()
        parts = self._map_batches(
            array, lambda terms: self._batch_scores(terms, weights)[1].cpu().numpy()
        )
        return np.concatenate(parts).astype(np.float64)

    def feature_errors(self, X: Any) -> npt.NDArray[np.float64]:
        """Each feature's share of each row's score, shape (rows, features).

        The shares are non-negative, proportional to the features' normalised
        reconstruction errors, and each row sums to its ``decision_function``
        score (up to float32 rounding).
        """
        array = self._check_input(X)
        weights = self._feature_weights()
        parts = self._map_batches(
            array, lambda terms: self._batch_contributions(terms, weights).cpu().numpy()
        )
        return np.concatenate(parts).astype(np.float64)

    def reconstruction_errors(self, X: Any) -> npt.NDArray[np.float64]:
        """Each feature's squared reconstruction error per row, in the units of ``X``
        (the ensemble's mean; shape rows x features): comparable between detectors
        fitted on other rows, unlike the scores."""
        array = self._check_input(X)
        parts = self._map_batches(array, lambda terms: terms.errors.cpu().numpy())
        return np.concatenate(parts).astype(np.float64) * self.scaler_.scale ** 2

    # -- persistence ----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to directory ``path`` (safetensors + JSON manifest)."""
        from anomaly_monitor.detectors.artifact import save_detector

        self._check_fitted()
        return save_detector(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> AutoencoderDetector:
        """Load a detector written by :meth:`save`, verifying its hash and shapes.

        Nothing is unpickled; a tampered or foreign file raises ``ArtifactError``.
        """
        from anomaly_monitor.detectors.artifact import load_detector

        return load_detector(cls, Path(path), device=device)
