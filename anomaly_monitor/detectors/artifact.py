"""Model artifacts: safetensors weights plus a JSON manifest, hash-checked, never pickled.

An artifact is two pieces: ``manifest.json`` (format version, kind,
hyperparameters, feature names, scaling state, expected tensor shapes, the
sha256 of the weights, library versions) and ``weights.safetensors``. Loading
checks the manifest, the hash, the safetensors header and every tensor's shape
before any weight is used; nothing is unpickled, so a hostile file cannot run code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from anomaly_monitor.detectors.capacity import legacy_architecture

if TYPE_CHECKING:
    from anomaly_monitor.detectors.estimator import AutoencoderDetector

FORMAT_NAME = "anomaly-monitor-detector"
FORMAT_VERSION = 2
#: Older format versions this release still reads (version 1 had no ``architecture``:
#: its layer sizes followed from the feature count).
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
#: Manifests and safetensors headers larger than this are refused unread.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Weights files larger than this are refused (a detector is a few MB at most).
MAX_WEIGHTS_BYTES = 1024 * 1024 * 1024


class ArtifactError(ValueError):
    """A model artifact is missing, malformed, tampered with or incompatible."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model's behaviour."""
    from anomaly_monitor import __version__

    return {
        "anomaly_monitor": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def dump_detector(detector: AutoencoderDetector) -> tuple[dict[str, Any], bytes]:
    """The manifest and the safetensors bytes of a fitted detector."""
    if detector.term_gamma_ is None:
        raise ArtifactError("this model was loaded from a format-1 artifact, which scores "
                            f"additively; format {FORMAT_VERSION} cannot hold it: retrain it")
    state, tensors = detector.export_state()
    weights = safetensors.torch.save(tensors, metadata={"format": FORMAT_NAME})
    params = detector.get_params()
    if params["hidden_dims"] is not None:
        params["hidden_dims"] = [int(h) for h in params["hidden_dims"]]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "class": type(detector).__name__,
        "kind": detector.kind,
        "hyperparameters": params,
        **state,
        "tensors": detector.tensor_specs(detector.n_features_in_),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "versions": library_versions(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return manifest, weights


def save_detector(detector: AutoencoderDetector, path: Path) -> Path:
    """Write ``manifest.json`` and ``weights.safetensors`` into directory ``path``."""
    manifest, weights = dump_detector(detector)
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS_FILE).write_bytes(weights)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def _read_limited(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size > limit:
        raise ArtifactError(f"{path} is {size} bytes, more than the {limit} allowed")
    return path.read_bytes()


def load_detector(
    cls: type[AutoencoderDetector], path: Path, *, device: str = "auto"
) -> AutoencoderDetector:
    """Read and verify an artifact directory written by :func:`save_detector`."""
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a model directory (expected {MANIFEST_FILE} in it)")
    raw = _read_limited(path / MANIFEST_FILE, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path / MANIFEST_FILE} is not valid JSON: {exc}") from None
    weights = _read_limited(path / WEIGHTS_FILE, MAX_WEIGHTS_BYTES)
    return restore_detector(cls, manifest, weights, device=device)


def _check_header(weights: bytes, expected: dict[str, dict[str, Any]]) -> None:
    """Check the safetensors header by hand before the library parses anything."""
    if len(weights) < 8:
        raise ArtifactError("weights are too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", weights[:8])
    if header_len > min(MAX_HEADER_BYTES, len(weights) - 8):
        raise ArtifactError(
            f"safetensors header claims {header_len} bytes; the file has {len(weights)}"
        )
    try:
        header = json.loads(weights[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError("weights are not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ArtifactError("weights are not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    found = {k: {"shape": v.get("shape"), "dtype": v.get("dtype")}
             for k, v in header.items() if isinstance(v, dict)}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ArtifactError(
            "weights do not match the model: "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}, "
            f"wrong shape {wrong or 'none'}"
        )


def _architecture(manifest: dict[str, Any], n_features: int) -> tuple[tuple[int, ...], int]:
    """The layer sizes a manifest records (version 1: derived from the feature count)."""
    params = manifest["hyperparameters"]
    if manifest["format_version"] == 1:
        hidden, latent = legacy_architecture(n_features)
        if params.get("hidden_dims") is not None:
            hidden = tuple(int(h) for h in params["hidden_dims"])
        if params.get("latent_dim") is not None:
            latent = int(params["latent_dim"])
    else:
        hidden = tuple(int(h) for h in manifest["architecture"]["hidden_dims"])
        latent = int(manifest["architecture"]["latent_dim"])
        explicit = params.get("hidden_dims"), params.get("latent_dim")
        if ((explicit[0] is not None and tuple(explicit[0]) != hidden)
                or (explicit[1] is not None and explicit[1] != latent)):
            raise ArtifactError("the manifest's architecture does not match its hyperparameters")
    return hidden, latent  # their range is checked by from_state


def restore_detector(
    cls: type[AutoencoderDetector],
    manifest: dict[str, Any],
    weights: bytes,
    *,
    device: str = "auto",
) -> AutoencoderDetector:
    """Rebuild a fitted detector from a manifest and safetensors bytes, verifying both."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"manifest is not an {FORMAT_NAME} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"manifest format version {manifest.get('format_version')!r} is not supported "
            f"(this release reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest.get("weights_sha256"):
        raise ArtifactError(
            f"weights sha256 {digest} does not match the manifest's "
            f"{manifest.get('weights_sha256')!r}: the artifact was altered or is not a model"
        )
    try:
        params = dict(manifest["hyperparameters"])
        if "score" in params:  # format 1 named score_type "score"
            params["score_type"] = params.pop("score")
        params["device"] = device
        cls(**params).validate_params()  # the hyperparameters' own message comes first
        n_features = int(manifest["n_features"])
        hidden, latent = _architecture(manifest, n_features)
        if manifest["format_version"] >= 2 and not isinstance(manifest["term_gamma"], list):
            raise ArtifactError("the manifest's term_gamma is malformed")
        state = {**manifest, "architecture": {"hidden_dims": list(hidden), "latent_dim": latent},
                 # Format 1 had no gamma nulls: its models score additively.
                 "term_gamma": (None if manifest["format_version"] == 1
                                else manifest["term_gamma"])}

        def load_tensors(expected: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
            if manifest.get("tensors") != expected:
                raise ArtifactError(
                    "the manifest's tensor shapes do not match its hyperparameters")
            _check_header(weights, expected)
            return safetensors.torch.load(weights)

        detector = cls.from_state(params, state, load_tensors)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, safetensors.SafetensorError) as exc:
        raise ArtifactError(f"model artifact is invalid: {exc}") from None
    return detector
