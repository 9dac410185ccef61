"""Saving and loading detectors: bit-identical round trips, hostile files refused."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

from anomaly_monitor import ArtifactError, AutoencoderDetector
from anomaly_monitor.detectors.artifact import FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data):
    train = pd.DataFrame(data[0], columns=[f"sensor_{i}" for i in range(8)])
    models = {}
    for kind in ("vae", "dae", "sae"):
        detector = AutoencoderDetector(kind, n_estimators=2, epochs=5).fit(train)
        path = detector.save(tmp_path_factory.mktemp(kind) / "model")
        models[kind] = (detector, path)
    return models


class Exploit:
    """Unpickling this creates ``marker``: proof that a payload was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite_weights(path, payload: bytes) -> None:
    """Replace the weights and forge a manifest hash that matches them."""
    (path / WEIGHTS_FILE).write_bytes(payload)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def _copy(src, dst):
    dst.mkdir()
    for name in (MANIFEST_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("kind", ["vae", "dae", "sae"])
def test_round_trip_scores_bit_identically(saved, data, kind):
    detector, path = saved[kind]
    x = pd.DataFrame(data[1], columns=detector.feature_names_in_)
    loaded = AutoencoderDetector.load(path)
    np.testing.assert_array_equal(loaded.decision_function(x), detector.decision_function(x))
    np.testing.assert_array_equal(loaded.feature_errors(x), detector.feature_errors(x))
    assert loaded.get_params() == {**detector.get_params(), "device": "auto"}


def test_manifest_describes_the_model(saved):
    detector, path = saved["vae"]
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    weights = (path / WEIGHTS_FILE).read_bytes()
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["kind"] == "vae"
    assert manifest["feature_names"] == [f"sensor_{i}" for i in range(8)]
    assert manifest["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["scaling"]["method"] == detector.scaling
    assert len(manifest["scaling"]["center"]) == 8
    assert set(manifest["versions"]) >= {"anomaly_monitor", "torch", "numpy", "safetensors"}
    assert manifest["hyperparameters"]["n_estimators"] == 2
    assert len(manifest["training"]) == 2


def test_pickle_payload_is_refused_and_never_executed(saved, tmp_path):
    marker = tmp_path / "pwned"
    path = _copy(saved["dae"][1], tmp_path / "model")
    payload = pickle.dumps({"weights": Exploit(marker)})
    (path / WEIGHTS_FILE).write_bytes(payload)
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        AutoencoderDetector.load(path)
    _rewrite_weights(path, payload)
    with pytest.raises(ArtifactError, match=r"not a safetensors file|header claims"):
        AutoencoderDetector.load(path)
    assert not marker.exists()


def test_torch_save_zip_is_refused(saved, tmp_path):
    marker = tmp_path / "pwned"
    path = _copy(saved["dae"][1], tmp_path / "model")
    buffer = tmp_path / "evil.pt"
    torch.save({"x": Exploit(marker)}, buffer, _use_new_zipfile_serialization=True)
    assert zipfile.is_zipfile(buffer)
    _rewrite_weights(path, buffer.read_bytes())
    with pytest.raises(ArtifactError):
        AutoencoderDetector.load(path)
    assert not marker.exists()


def test_flipped_byte_is_refused(saved, tmp_path):
    path = _copy(saved["sae"][1], tmp_path / "model")
    weights = bytearray((path / WEIGHTS_FILE).read_bytes())
    weights[-5] ^= 0x01
    (path / WEIGHTS_FILE).write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match=r"sha256 .* does not match"):
        AutoencoderDetector.load(path)


def test_oversized_header_is_refused(saved, tmp_path):
    path = _copy(saved["vae"][1], tmp_path / "model")
    weights = (path / WEIGHTS_FILE).read_bytes()
    _rewrite_weights(path, struct.pack("<Q", 2**62) + weights[8:])
    with pytest.raises(ArtifactError, match="header claims"):
        AutoencoderDetector.load(path)


def test_wrong_shapes_are_refused(saved, tmp_path):
    detector, src = saved["dae"]
    path = _copy(src, tmp_path / "model")
    tensors = {f"{i}.{k}": v.clone() for i, m in enumerate(detector.modules_)
               for k, v in m.state_dict().items()}
    first = next(iter(tensors))
    tensors[first] = torch.zeros(3, 3)
    _rewrite_weights(path, safetensors.torch.save(tensors))
    with pytest.raises(ArtifactError, match="wrong shape"):
        AutoencoderDetector.load(path)


def test_manifest_tampering_is_refused(saved, tmp_path):
    path = _copy(saved["vae"][1], tmp_path / "model")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["hyperparameters"]["latent_dim"] = 7
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="architecture does not match its hyperparameters"):
        AutoencoderDetector.load(path)
    manifest["hyperparameters"]["latent_dim"] = None
    manifest["architecture"]["latent_dim"] = 7
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="tensor shapes do not match"):
        AutoencoderDetector.load(path)
    manifest["architecture"] = {"hidden_dims": [10**6, 10**6], "latent_dim": 10**6}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="tensor shapes do not match"):
        AutoencoderDetector.load(path)  # refused from shapes alone, nothing allocated
    manifest["hyperparameters"] = {"evil": "__import__('os')"}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unexpected keyword argument 'evil'"):
        AutoencoderDetector.load(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not a model directory"), (b"{nope", "not valid JSON"),
     (json.dumps({"format": "other"}).encode(), "not an anomaly-monitor-detector manifest"),
     (json.dumps({"format": "anomaly-monitor-detector", "format_version": 99}).encode(),
      "format version 99 is not supported")],
)
def test_bad_manifests_are_refused(tmp_path, content, message):
    path = tmp_path / "model"
    if content is not None:
        path.mkdir()
        (path / MANIFEST_FILE).write_bytes(content)
        (path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ArtifactError, match=message):
        AutoencoderDetector.load(path)


def test_a_format_2_manifest_without_term_gamma_is_refused(saved, tmp_path):
    """Format 2 always has the gamma nulls: without them the model would silently
    score additively, like a format-1 model."""
    path = _copy(saved["vae"][1], tmp_path / "model")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["term_gamma"] = None
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="term_gamma is malformed"):
        AutoencoderDetector.load(path)
