"""The mini-batch training loop with a validation split and early stopping."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from anomaly_monitor.detectors.progress import FitProgress


class TrainableModule(Protocol):
    """What the loop needs of a module: per-row losses plus a batch-level penalty."""

    def training_loss(
        self, x: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of one training run (a subset of the detector's hyperparameters)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    patience: int
    trim_fraction: float
    max_steps: int = 6_000


@dataclass
class TrainingHistory:
    """Losses per epoch and where early stopping settled."""

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable summary."""
        return {
            "epochs_run": len(self.train_loss),
            "best_epoch": self.best_epoch,
            "final_train_loss": self.train_loss[-1] if self.train_loss else None,
            "best_validation_loss": (
                self.validation_loss[self.best_epoch - 1] if self.validation_loss else None
            ),
        }


def trimmed_mean(losses: Tensor, trim_fraction: float) -> Tensor:
    """Mean of ``losses`` after dropping the largest ``trim_fraction`` of them.

    Rows the model reconstructs worst are most likely anomalies in unlabelled
    training data; leaving them out of the loss keeps the model from learning them.
    """
    keep = losses.shape[0] - int(trim_fraction * losses.shape[0])
    if keep >= losses.shape[0]:
        return losses.mean()
    return torch.topk(losses, max(keep, 1), largest=False, sorted=False).values.mean()


def _validation_loss(
    module: nn.Module, x_val: Tensor, config: TrainingConfig, seed: int
) -> float:
    # A fixed seed makes the noisy losses of DAE/VAE comparable from epoch to epoch.
    generator = torch.Generator(device=x_val.device).manual_seed(seed)
    module.eval()
    with torch.no_grad():
        total = 0.0
        for start in range(0, x_val.shape[0], 65536):
            rows, penalty = module.training_loss(x_val[start:start + 65536], generator)
            total += float(trimmed_mean(rows, config.trim_fraction)) * rows.shape[0]
            total += float(penalty) * rows.shape[0]
    return total / x_val.shape[0]


def train_module(
    module: nn.Module,
    x_train: Tensor,
    x_val: Tensor | None,
    config: TrainingConfig,
    seed: int,
    progress: FitProgress | None = None,
) -> TrainingHistory:
    """Train ``module`` in place with Adam; keep the weights of the best validation epoch.

    Training ends after ``epochs`` epochs, ``patience`` epochs without improvement or
    ``max_steps`` mini-batches, whichever comes first. Without a validation set
    early stopping is off and the last weights are kept.
    """
    generator = torch.Generator(device=x_train.device).manual_seed(seed)
    optimizer = torch.optim.Adam(
        module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    history = TrainingHistory()
    best_loss, best_state, stale = float("inf"), None, 0
    n_rows = x_train.shape[0]
    batch_size = min(config.batch_size, n_rows)
    steps = 0
    for epoch in range(1, config.epochs + 1):
        module.train()
        order = torch.randperm(n_rows, generator=generator, device=x_train.device)
        epoch_loss = 0.0
        starts = range(0, n_rows - batch_size + 1, batch_size)[:config.max_steps - steps]
        steps += len(starts)
        for start in starts:
            batch = x_train[order[start:start + batch_size]]
            rows, penalty = module.training_loss(batch, generator)
            loss = trimmed_mean(rows, config.trim_fraction) + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach())
        history.train_loss.append(epoch_loss / max(1, len(starts)))
        if progress is not None:
            progress.update(1)
        if x_val is None:
            history.best_epoch = epoch
        else:
            val_loss = _validation_loss(module, x_val, config, seed)
            history.validation_loss.append(val_loss)
            if progress is not None:
                progress.set_postfix(val_loss=f"{val_loss:.4g}")
            if val_loss < best_loss:
                best_loss, stale, history.best_epoch = val_loss, 0, epoch
                best_state = copy.deepcopy(module.state_dict())
            else:
                stale += 1
        if stale >= config.patience or steps >= config.max_steps:
            if progress is not None:
                progress.skip(config.epochs - epoch)
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history
