"""The denoising autoencoder as a pure ``nn.Module`` (no fitting logic here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from anomaly_monitor.detectors.layers import EncoderDecoder, mlp
from anomaly_monitor.hyperparameters import NOISE_TYPES


class DenoisingAutoencoder(EncoderDecoder):
    """An MLP autoencoder trained to reconstruct clean rows from corrupted ones.

    Corruption (training only): ``gaussian`` adds N(0, ``noise_level``^2) to every
    scaled feature; ``masking`` sets a random ``noise_level`` fraction of the
    features to 0 (the training mean after scaling); ``none`` gives a plain
    autoencoder.
    """

    def __init__(
        self,
        n_features: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        activation: str = "relu",
        noise: str = "gaussian",
        noise_level: float = 0.1,
    ) -> None:
        super().__init__()
        if noise not in NOISE_TYPES:
            raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
        self.noise = noise
        self.noise_level = noise_level
        self.encoder = mlp([n_features, *hidden_dims, latent_dim], activation)
        self.decoder = mlp([latent_dim, *reversed(hidden_dims), n_features], activation)

    def corrupt(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """``x`` with training noise applied."""
        if self.noise == "gaussian" and self.noise_level > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return x + self.noise_level * noise
        if self.noise == "masking" and self.noise_level > 0:
            keep = torch.rand(x.shape, generator=generator, device=x.device) >= self.noise_level
            return x * keep
        return x

    def training_loss(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Per-row squared reconstruction error of the clean row, and a zero penalty."""
        reconstruction = self(self.corrupt(x, generator))
        return ((reconstruction - x) ** 2).sum(dim=1), x.new_zeros(())
