"""Autoencoder detectors: pure ``nn.Module`` networks and the estimator that wraps them."""

from anomaly_monitor.detectors.artifact import ArtifactError
from anomaly_monitor.detectors.base import NotFittedError
from anomaly_monitor.detectors.estimator import AutoencoderDetector
from anomaly_monitor.hyperparameters import KINDS

__all__ = ["KINDS", "ArtifactError", "AutoencoderDetector", "NotFittedError"]
