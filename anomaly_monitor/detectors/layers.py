"""Building blocks shared by the autoencoder modules."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn

from anomaly_monitor.hyperparameters import ACTIVATIONS

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


def mlp(sizes: Sequence[int], activation: str, *, last_activation: bool = False) -> nn.Sequential:
    """A stack of linear layers ``sizes[0] -> sizes[1] -> ...`` with ``activation`` between.

    The activation follows every layer but the last unless ``last_activation``.
    """
    if activation not in ACTIVATION_MODULES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(ACTIVATION_MODULES[activation]())
    return nn.Sequential(*layers)


class EncoderDecoder(nn.Module):
    """An autoencoder with deterministic ``encoder`` and ``decoder`` submodules."""

    encoder: nn.Module
    decoder: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x`` (deterministic)."""
        return self.decoder(self.encoder(x))

    def forward_with_code(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The reconstruction of ``x`` and its code (deterministic)."""
        code = self.encoder(x)
        return self.decoder(code), code
