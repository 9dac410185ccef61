"""The variational autoencoder as a pure ``nn.Module``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from anomaly_monitor.detectors.layers import mlp

#: log-variance of the latent posterior is clamped to this range for numerical safety.
LOGVAR_RANGE = (-12.0, 8.0)


class VariationalAutoencoder(nn.Module):
    """A Gaussian VAE with a unit-variance Gaussian decoder on scaled features.

    Training minimises the negative ELBO: squared reconstruction error (the
    Gaussian log-likelihood up to a constant) plus ``beta`` times the KL
    divergence of the posterior ``N(mu, sigma^2)`` from ``N(0, I)``.
    """

    def __init__(
        self,
        n_features: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        activation: str = "relu",
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.beta = beta
        self.encoder = mlp([n_features, *hidden_dims], activation, last_activation=True)
        width = hidden_dims[-1] if hidden_dims else n_features
        self.mu = nn.Linear(width, latent_dim)
        self.logvar = nn.Linear(width, latent_dim)
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), n_features], activation)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and (clamped) log-variance."""
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(*LOGVAR_RANGE)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction from the posterior mean (deterministic)."""
        mu, _ = self.encode(x)
        return self.decoder(mu)

    def forward_with_code(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction from the posterior mean, and the mean itself (deterministic)."""
        mu = self.mu(self.encoder(x))  # the log-variance is not needed: skip its layer
        return self.decoder(mu), mu

    @staticmethod
    def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
        """Per-row KL(N(mu, exp(logvar)) || N(0, I))."""
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)

    def sample_reconstruction(
        self, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One reparameterised reconstruction, with the posterior parameters."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return self.decoder(mu + eps * torch.exp(0.5 * logvar)), mu, logvar

    def training_loss(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Per-row negative ELBO (up to a constant), and a zero penalty."""
        reconstruction, mu, logvar = self.sample_reconstruction(x, generator)
        recon = ((reconstruction - x) ** 2).sum(dim=1)
        return recon + self.beta * self.kl_divergence(mu, logvar), x.new_zeros(())

    def mc_feature_errors(self, x: Tensor, n_samples: int, generator: torch.Generator) -> Tensor:
        """Per-feature squared error averaged over ``n_samples`` posterior samples.

        This is the Monte-Carlo reconstruction probability of An and Cho (2015)
        for a unit-variance Gaussian decoder, up to an affine transform.
        """
        total = torch.zeros_like(x)
        for _ in range(n_samples):
            reconstruction, _, _ = self.sample_reconstruction(x, generator)
            total += (reconstruction - x) ** 2
        return total / n_samples
