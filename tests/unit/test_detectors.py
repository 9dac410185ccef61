"""The estimator contract, quality floors and determinism of AutoencoderDetector."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomaly_monitor import AutoencoderDetector, NotFittedError
from anomaly_monitor.detectors.sparse import SparseAutoencoder
from tests.conftest import correlated_data

KINDS = ["vae", "dae", "sae"]


@pytest.fixture(scope="module")
def fitted(data) -> dict[str, AutoencoderDetector]:
    train, _, _ = data
    return {kind: AutoencoderDetector(kind).fit(train) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_quality_floor_on_broken_correlations(fitted, data, kind):
    _, x_test, y_test = data
    scores = fitted[kind].decision_function(x_test)
    assert roc_auc_score(y_test, scores) >= 0.95


@pytest.mark.parametrize("score_type", ["elbo", "mc"])
def test_vae_alternative_scores_rank_anomalies_high(data, score_type):
    train, x_test, y_test = data
    detector = AutoencoderDetector("vae", score_type=score_type, n_estimators=1).fit(train)
    scores = detector.decision_function(x_test)
    assert roc_auc_score(y_test, scores) >= 0.9
    np.testing.assert_array_equal(scores, detector.decision_function(x_test))


def test_gaussian_noise_dae(data):
    train, x_test, y_test = data
    detector = AutoencoderDetector("dae", noise="gaussian", noise_level=0.1, n_estimators=1)
    scores = detector.fit(train).decision_function(x_test)
    assert roc_auc_score(y_test, scores) >= 0.9


def test_init_only_stores_parameters():
    detector = AutoencoderDetector("nonsense", epochs=-3)
    assert detector.kind == "nonsense" and detector.epochs == -3
    assert not [name for name in vars(detector) if name.endswith("_")]
    assert detector.get_params()["epochs"] == -3
    assert "kind='nonsense'" in repr(detector)


def test_fit_returns_self_and_sets_fitted_attributes(fitted, data):
    detector = fitted["dae"]
    assert detector.n_features_in_ == data[0].shape[1]
    assert len(detector.modules_) == detector.n_estimators
    assert detector.error_scale_.shape == (data[0].shape[1],)
    train = data[0][:200]
    small = AutoencoderDetector("dae", n_estimators=1, epochs=2)
    assert small.fit(train) is small


@pytest.mark.parametrize("kind", KINDS)
def test_feature_errors_are_shares_of_the_score(fitted, data, kind):
    x = data[1][:50]
    shares = fitted[kind].feature_errors(x)
    assert shares.shape == x.shape
    assert (shares >= 0).all()
    np.testing.assert_allclose(shares.sum(axis=1), fitted[kind].decision_function(x), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_shifted_feature_gets_the_largest_share(kind):
    # Three factors, each measured by three noisy sensors: a shifted sensor is the
    # odd one out of its group. (Within a pair of collinear sensors blame is
    # ambiguous by nature, so the data has groups of three.)
    rng = np.random.default_rng(5)
    train = np.repeat(rng.normal(size=(1500, 3)), 3, axis=1) + 0.1 * rng.normal(size=(1500, 9))
    detector = AutoencoderDetector(kind, n_estimators=1).fit(train)
    for j in range(train.shape[1]):
        rows = train[:20].copy()
        rows[:, j] += 5 * train[:, j].std()
        shares = detector.feature_errors(rows)
        # The masking DAE learns to rebuild a sensor from its group, so some blame
        # leaks to the group; the shifted sensor still carries the most on average.
        assert int(shares.mean(axis=0).argmax()) == j, f"feature {j}"
        assert all(j in np.argsort(-row)[:3] for row in shares), f"feature {j}"


def test_scores_higher_for_anomalies(fitted, data):
    _, x_test, y_test = data
    scores = fitted["vae"].decision_function(x_test)
    assert scores[y_test == 1].mean() > 3 * scores[y_test == 0].mean()


@pytest.mark.parametrize("kind", KINDS)
def test_fit_is_deterministic(kind):
    train, x_test, _ = correlated_data(n_normal=400, n_anomalies=20, seed=3)
    params = {"n_estimators": 2, "epochs": 5}
    a = AutoencoderDetector(kind, random_state=7, **params).fit(train).decision_function(x_test)
    b = AutoencoderDetector(kind, random_state=7, **params).fit(train).decision_function(x_test)
    c = AutoencoderDetector(kind, random_state=8, **params).fit(train).decision_function(x_test)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fit_leaves_global_torch_rng_alone(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    AutoencoderDetector("vae", n_estimators=1, epochs=2).fit(data[0][:100])
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_scoring_is_batch_independent(fitted, data):
    x = data[1]
    whole = fitted["vae"].decision_function(x)
    single = np.array([fitted["vae"].decision_function(x[i:i + 1])[0] for i in range(10)])
    np.testing.assert_allclose(single, whole[:10], rtol=1e-5)


def test_dataframe_input_keeps_names_and_checks_them(data):
    train = pd.DataFrame(data[0], columns=[f"f{i}" for i in range(8)])
    detector = AutoencoderDetector("dae", n_estimators=1, epochs=2).fit(train)
    assert detector.feature_names_in_ == list(train.columns)
    assert detector.decision_function(train.head(3)).shape == (3,)
    with pytest.raises(ValueError, match="fitted with"):
        detector.decision_function(train[list(reversed(train.columns))])
    text = train.assign(f0=train["f0"].astype(str))
    with pytest.raises(ValueError, match="non-numeric columns: f0"):
        detector.decision_function(text)


@pytest.mark.parametrize("method", ["decision_function", "feature_errors"])
def test_scoring_before_fit_is_a_clear_error(method):
    with pytest.raises(NotFittedError, match="not fitted yet"):
        getattr(AutoencoderDetector(), method)(np.zeros((2, 3)))


def test_save_before_fit_is_a_clear_error(tmp_path):
    with pytest.raises(NotFittedError):
        AutoencoderDetector().save(tmp_path / "m")


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros(10), "must be 2-D"),
        (np.zeros((10, 2, 2)), "must be 2-D"),
        (np.zeros((3, 2)), r"3 sample\(s\) \(rows\); at least 8"),
        (np.zeros((10, 0)), r"0 feature\(s\)"),
        (np.where(np.eye(10, 4) == 1, np.nan, 0.0),
         r"NaN or infinity in 4 row\(s\); first at row 0, column 0"),
        (np.r_[np.zeros((9, 3)), [[0.0, np.inf, 0.0]]], "first at row 9, column 1"),
        ([["a", "b"]] * 10, "must be numeric"),
    ],
)
def test_bad_training_input_is_rejected(x, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderDetector(n_estimators=1, epochs=1).fit(x)


def test_wrong_feature_count_at_scoring(fitted):
    expected = "X has 5 features, but AutoencoderDetector is expecting 8 features"
    with pytest.raises(ValueError, match=expected):
        fitted["vae"].decision_function(np.zeros((2, 5)))


def test_nan_at_scoring_names_the_row(fitted):
    x = np.zeros((4, 8))
    x[2, 5] = np.nan
    with pytest.raises(ValueError, match="first at row 2, column 5"):
        fitted["vae"].decision_function(x)


def test_huge_values_give_finite_scores(fitted):
    x = np.zeros((2, 8))
    x[1, 0] = 1e300
    scores = fitted["dae"].decision_function(x)
    assert np.isfinite(scores).all() and scores[1] > scores[0]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kind": "gan"}, "kind must be one of vae, dae, sae"),
        ({"kind": "dae", "score_type": "elbo"}, "needs kind='vae'"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"n_estimators": 1.5}, "n_estimators must be a positive integer"),
        ({"validation_fraction": 0.9}, "validation_fraction must be in"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"scaling": "minmax"}, "scaling must be one of"),
        ({"learning_rate": 0}, "learning_rate must be positive"),
        ({"hidden_dims": (8, 0)}, "hidden_dims must be a list of positive integers"),
        ({"latent_dim": 0}, "latent_dim must be a positive integer"),
        ({"latent_dim": "4"}, "latent_dim must be a positive integer"),
        ({"latent_dim": 2.5}, "latent_dim must be a positive integer"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
    ],
)
def test_bad_hyperparameters_fail_at_fit(data, params, message):
    detector = AutoencoderDetector(**{"epochs": 1, "n_estimators": 1, **params})
    with pytest.raises(ValueError, match=message):
        detector.fit(data[0][:50])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_requested_without_device():
    with pytest.raises(ValueError, match="no CUDA device"):
        AutoencoderDetector(device="cuda").fit(np.zeros((20, 2)))


def test_early_stopping_stops_before_the_epoch_budget(data):
    detector = AutoencoderDetector("dae", n_estimators=1, epochs=500, patience=3).fit(data[0])
    history = detector.history_[0]
    assert len(history.train_loss) < 500
    assert history.best_epoch == len(history.validation_loss) - 3
    assert min(history.validation_loss) == history.validation_loss[history.best_epoch - 1]


def test_sparse_penalty_is_on_the_code_layer():
    module = SparseAutoencoder(6, (16,), 10, sparsity_target=0.1, sparsity_weight=1.0)
    at_target = torch.full((32, 10), 0.1)
    assert float(module.sparsity_penalty(at_target)) == pytest.approx(0.0, abs=1e-6)
    assert float(module.sparsity_penalty(torch.full((32, 10), 0.5))) > 0.1


def test_sparse_training_drives_code_activations_to_the_target(data):
    detector = AutoencoderDetector(
        "sae", n_estimators=1, sparsity_target=0.05, sparsity_weight=1.0
    ).fit(data[0])
    module = detector.modules_[0]
    with torch.no_grad():
        x = torch.from_numpy(detector.scaler_.transform(data[0]))
        mean_activation = float(module.encoder(x).mean())
    assert mean_activation < 0.15


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_fit_matches_quality_and_moves_to_cpu(tmp_path, data, kind):
    train, x_test, y_test = data
    detector = AutoencoderDetector(kind, device="cuda").fit(train)
    assert detector.device_.type == "cuda"
    scores = detector.decision_function(x_test)
    assert roc_auc_score(y_test, scores) >= 0.95
    cpu = AutoencoderDetector.load(detector.save(tmp_path / kind), device="cpu")
    np.testing.assert_allclose(cpu.decision_function(x_test), scores, rtol=1e-4, atol=1e-6)


def test_latent_distance_catches_extremes_along_the_manifold(data):
    train, x_test, _ = data
    normal = x_test[:400]
    extreme = train[:50] * 6.0  # on the manifold, far out: reconstructed well
    x = np.vstack([normal, extreme])
    y = np.r_[np.zeros(len(normal)), np.ones(len(extreme))]
    detector = AutoencoderDetector("dae", n_estimators=1, latent_weight=1.0).fit(train)
    assert detector.latent_whitening_.shape[1:] == (2, 2)
    assert roc_auc_score(y, detector.decision_function(x)) >= 0.95
    shares = detector.feature_errors(x)
    np.testing.assert_allclose(shares.sum(axis=1), detector.decision_function(x), rtol=1e-5)
