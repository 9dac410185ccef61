"""anomaly-monitor: watch SQL tables for anomalous rows with autoencoder detectors.

``AutoencoderDetector`` is imported lazily so that the command line starts
without loading PyTorch until a model is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ArtifactError", "AutoencoderDetector", "NotFittedError", "__version__"]

if TYPE_CHECKING:
    from anomaly_monitor.detectors import ArtifactError, AutoencoderDetector, NotFittedError


def __getattr__(name: str) -> Any:
    if name in {"AutoencoderDetector", "ArtifactError", "NotFittedError"}:
        from anomaly_monitor import detectors

        return getattr(detectors, name)
    raise AttributeError(f"module 'anomaly_monitor' has no attribute {name!r}")
