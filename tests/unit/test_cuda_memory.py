"""CUDA out of memory: scoring and training halve their steps and try again, then move
to the CPU, counting each event. (An out-of-memory error is injected: this machine may
have no GPU; the GPU session runs the same paths for real.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_monitor.detectors.estimator import AutoencoderDetector


def _oom() -> Exception:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="module")
def fitted():
    x = np.random.default_rng(0).normal(size=(400, 5))
    return AutoencoderDetector("dae", n_estimators=1, epochs=3, device="cpu").fit(x), x


def test_scoring_halves_its_batches_until_they_fit(fitted, monkeypatch):
    detector, _ = fitted
    rows = np.random.default_rng(1).normal(size=(3000, 5))
    expected = detector.decision_function(rows)
    original = AutoencoderDetector._batch_terms

    def tight(self, x, latent):
        if x.shape[0] > 1000:
            raise _oom()
        return original(self, x, latent)

    monkeypatch.setattr(AutoencoderDetector, "_batch_terms", tight)
    before = detector.oom_counts().halved
    scores = detector.decision_function(rows)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert detector.oom_counts().halved - before == 7  # 65536 -> 512 rows per batch


def test_an_oom_at_the_smallest_batch_on_the_cpu_is_raised(fitted, monkeypatch):
    detector, x = fitted

    def never(self, x, latent):
        raise _oom()

    monkeypatch.setattr(AutoencoderDetector, "_batch_terms", never)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        detector.decision_function(x[:10])


def test_at_the_smallest_batch_a_cuda_detector_moves_to_the_cpu(fitted):
    detector, x = fitted
    detector.device_ = torch.device("cuda")  # as if it ran there (nothing is allocated)
    assert detector._after_oom(256, 256, _oom()) == 256
    assert detector.device_.type == "cpu" and detector.oom_counts().cpu == 1
    assert all(p.device.type == "cpu" for m in detector.modules_ for p in m.parameters())
    assert np.isfinite(detector.decision_function(x[:5])).all()


def test_training_halves_its_minibatch_until_it_fits(monkeypatch):
    original = AutoencoderDetector._fit_one
    sizes = []

    def tight(self, scaled, config, seed, progress):
        sizes.append(config.batch_size)
        if config.batch_size > 32:
            raise _oom()
        return original(self, scaled, config, seed, progress)

    monkeypatch.setattr(AutoencoderDetector, "_fit_one", tight)
    x = np.random.default_rng(2).normal(size=(300, 4))
    detector = AutoencoderDetector("vae", n_estimators=2, epochs=2, batch_size=128,
                                   device="cpu").fit(x)
    assert sizes == [128, 64, 32, 32] and detector.oom_counts().halved == 2
    assert np.isfinite(detector.decision_function(x)).all()
