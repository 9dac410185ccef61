"""The sparse autoencoder as a pure ``nn.Module``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly_monitor.detectors.layers import EncoderDecoder, mlp

#: Mean activations are clamped into (EPS, 1 - EPS) before the KL divergence.
EPS = 1.0e-6


class SparseAutoencoder(EncoderDecoder):
    """An autoencoder whose code layer of sigmoid units is pushed to be sparse.

    The penalty is ``sparsity_weight * sum_j KL(rho || rho_hat_j)``, where
    ``rho_hat_j`` is the mean activation of code unit ``j`` over the mini-batch
    and ``rho`` the target rate (Ng's sparse autoencoder). It is applied to the
    hidden code, not to the output layer.
    """

    def __init__(
        self,
        n_features: int,
        hidden_dims: Sequence[int],
        code_dim: int,
        activation: str = "relu",
        sparsity_target: float = 0.05,
        sparsity_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 < sparsity_target < 1.0:
            raise ValueError(f"sparsity_target must be in (0, 1), got {sparsity_target}")
        self.sparsity_target = sparsity_target
        self.sparsity_weight = sparsity_weight
        self.encoder = nn.Sequential(
            mlp([n_features, *hidden_dims, code_dim], activation), nn.Sigmoid()
        )
        self.decoder = mlp([code_dim, *reversed(hidden_dims), n_features], activation)

    def sparsity_penalty(self, code: Tensor) -> Tensor:
        """``sparsity_weight`` * sum over code units of KL(rho || mean activation)."""
        rho = self.sparsity_target
        rho_hat = code.mean(dim=0).clamp(EPS, 1.0 - EPS)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        return self.sparsity_weight * kl.sum()

    def training_loss(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-row squared reconstruction error, and the batch's sparsity penalty."""
        code = self.encoder(x)
        reconstruction = self.decoder(code)
        return ((reconstruction - x) ** 2).sum(dim=1), self.sparsity_penalty(code)
