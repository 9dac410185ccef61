"""The detector's hyperparameter vocabulary, declared once and free of torch.

``config`` checks ``[monitor.model]`` tables against it without importing the
deep-learning runtime; the estimator, its modules and the preprocessing use the
same tuples.
"""

from __future__ import annotations

#: Autoencoder kinds: variational, denoising, sparse.
KINDS: tuple[str, ...] = ("vae", "dae", "sae")
#: What a VAE's score is made of (``reconstruction`` for every kind).
SCORE_TYPES: tuple[str, ...] = ("reconstruction", "elbo", "mc")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Corruptions of the denoising autoencoder.
NOISE_TYPES: tuple[str, ...] = ("gaussian", "masking", "none")
#: Hidden-layer activations (the modules are in ``detectors.layers``).
ACTIVATIONS: tuple[str, ...] = ("relu", "elu", "tanh", "leaky_relu", "silu")
#: Per-feature scaling of the input rows.
SCALING_METHODS: tuple[str, ...] = ("standard", "robust", "none")

#: The hyperparameters a ``[monitor.model]`` table may set: every ``AutoencoderDetector``
#: parameter but ``kind`` (the monitor's own key), ``device`` and ``verbose`` (``run``
#: options). A test checks them against the estimator's signature.
MODEL_PARAMETERS: tuple[str, ...] = (
    "hidden_dims", "latent_dim", "activation", "n_estimators", "epochs", "max_steps",
    "batch_size", "learning_rate", "weight_decay", "validation_fraction", "patience",
    "trim_fraction", "scaling", "normalize_errors", "noise", "noise_level", "beta",
    "sparsity_target", "sparsity_weight", "score_type", "mc_samples", "latent_weight",
    "random_state",
)
#: Hyperparameters renamed since an earlier release: old name -> new name.
RENAMED_MODEL_PARAMETERS: dict[str, str] = {"score": "score_type"}
