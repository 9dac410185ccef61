"""CUDA out-of-memory handling: halve the rows per step and try again, then fall back to
the CPU. Each event is counted on the detector (``cuda_oom_``) for the metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Scoring halves its rows per batch down to this many; below, it moves to the CPU.
MIN_SCORE_BATCH_ROWS = 256
#: Training halves its minibatch down to this many rows; below, it moves to the CPU.
MIN_FIT_BATCH_ROWS = 8
#: What the events are counted as: the batch was halved, or the model moved to the CPU.
OOM_ACTIONS = ("halved", "cpu")


@dataclass
class OomCounts:
    """CUDA out-of-memory events a detector handled, by what it did."""

    halved: int = 0
    cpu: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"halved": self.halved, "cpu": self.cpu}


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc))


def release_cached() -> None:
    """Give CUDA's cached blocks back before trying again."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
