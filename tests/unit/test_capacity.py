"""Capacity chosen from the data: the code size follows the data's intrinsic dimension."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomaly_monitor import AutoencoderDetector
from anomaly_monitor.detectors.artifact import MANIFEST_FILE, ArtifactError
from anomaly_monitor.detectors.capacity import (
    WINDOW_FIRST_WIDTH,
    WINDOW_SECOND_WIDTH,
    auto_architecture,
    intrinsic_dimension,
    window_widths,
)


def factor_data(n_sensors: int, n_factors: int, n_rows: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(n_factors, n_sensors))
    x = rng.normal(size=(n_rows, n_factors)) @ mixing + 0.05 * rng.normal(size=(n_rows, n_sensors))
    return (x - x.mean(axis=0)) / x.std(axis=0)


@pytest.mark.parametrize(("n_sensors", "n_factors"), [(8, 2), (12, 4), (24, 7), (64, 12)])
def test_intrinsic_dimension_counts_the_factors(n_sensors, n_factors):
    # Random mixing makes factors unequally strong, so the estimate may fall a little
    # short of the count, never far; it is never inflated by the noise directions.
    estimate = intrinsic_dimension(factor_data(n_sensors, n_factors))
    assert n_factors - max(1, n_factors // 4) <= estimate <= n_factors


def test_a_few_extreme_rows_add_no_dimension():
    x = factor_data(12, 4)
    polluted = x.copy()
    polluted[:30] += 40.0 * np.eye(12)[np.arange(30) % 12]  # 1% of rows, one huge feature each
    assert intrinsic_dimension(polluted) == intrinsic_dimension(x)


def test_architecture_bounds():
    hidden, latent = auto_architecture(factor_data(3, 3))
    assert latent == 2  # below the feature count, else the code can copy anomalies through
    hidden, latent = auto_architecture(factor_data(200, 80, n_rows=2000))
    assert latent <= 64 and min(hidden) >= latent


def test_window_widths_stay_narrow_for_wide_windows():
    assert window_widths(5) == (WINDOW_FIRST_WIDTH[0], WINDOW_SECOND_WIDTH[0])
    assert window_widths(33) == (66, 33)  # one feature, a window of 32: as a row monitor's
    assert window_widths(132) == (WINDOW_FIRST_WIDTH[1], WINDOW_SECOND_WIDTH[1])
    assert auto_architecture(factor_data(132, 8))[0] == (256, 128)  # a row monitor's bound


def test_fit_records_the_chosen_capacity(tmp_path):
    x = factor_data(12, 4)
    detector = AutoencoderDetector("dae", n_estimators=1, epochs=2).fit(x)
    assert detector.latent_dim_ == intrinsic_dimension(detector.scaler_.transform(x))
    assert detector.hidden_dims_ == auto_architecture(detector.scaler_.transform(x))[0]
    manifest = json.loads((detector.save(tmp_path / "m") / MANIFEST_FILE).read_text())
    assert manifest["architecture"] == {"hidden_dims": list(detector.hidden_dims_),
                                        "latent_dim": detector.latent_dim_}
    loaded = AutoencoderDetector.load(tmp_path / "m", device="cpu")
    assert (loaded.latent_dim_, loaded.hidden_dims_) == (detector.latent_dim_,
                                                         detector.hidden_dims_)
    np.testing.assert_array_equal(loaded.decision_function(x), detector.decision_function(x))


def test_explicit_sizes_win():
    x = factor_data(12, 4)
    detector = AutoencoderDetector("vae", latent_dim=7, hidden_dims=(20,), n_estimators=1,
                                   epochs=1).fit(x)
    assert detector.latent_dim_ == 7 and detector.hidden_dims_ == (20,)
    assert detector.latent_dim == 7  # the hyperparameter itself is left as given


def test_format_1_artifacts_still_load(tmp_path):
    # A real format-1 model, saved by the release before capacity came from the data
    # (tests/data/format1-vae, with the scores it gave then): no architecture in the
    # manifest (sizes followed from the feature count), score_type was called
    # "score", and the score was the additive one. It must load and score as it did.
    path = Path(__file__).resolve().parents[1] / "data" / "format1-vae"
    assert json.loads((path / MANIFEST_FILE).read_text())["format_version"] == 1
    expected = np.load(path / "expected.npz", allow_pickle=False)
    loaded = AutoencoderDetector.load(path, device="cpu")
    assert loaded.latent_dim_ == 2 and loaded.hidden_dims_ == (8,)
    np.testing.assert_allclose(loaded.decision_function(expected["x"]), expected["scores"],
                               rtol=1e-5)
    np.testing.assert_allclose(loaded.feature_errors(expected["x"]), expected["shares"],
                               rtol=1e-5, atol=1e-7)
    # The current format cannot hold its additive score: re-saving says so.
    with pytest.raises(ArtifactError, match="format-1 artifact"):
        loaded.save(tmp_path / "resaved")
