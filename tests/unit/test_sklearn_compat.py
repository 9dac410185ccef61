"""scikit-learn compatibility: parameters, clone, and the applicable estimator checks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from anomaly_monitor import AutoencoderDetector

#: Checks that do not apply to this detector, and why.
NOT_APPLICABLE = {
    "check_estimators_unfitted": (
        "raises anomaly_monitor's NotFittedError (a ValueError and AttributeError, like "
        "scikit-learn's); scikit-learn is not a runtime dependency to subclass from"
    ),
    "check_methods_subset_invariance": (
        "scores are computed in float32: rows scored in batches of other sizes agree to "
        "about 1e-6 relative, not the check's 1e-7 (test_scoring_is_batch_independent)"
    ),
}


def _expected_failures(estimator: AutoencoderDetector) -> dict[str, str]:
    return NOT_APPLICABLE


def test_get_and_set_params_round_trip():
    detector = AutoencoderDetector("dae", latent_dim=4, hidden_dims=(16, 8))
    params = detector.get_params(deep=True)
    assert params == detector.get_params(deep=False)
    assert params["kind"] == "dae" and params["latent_dim"] == 4
    assert detector.set_params(latent_dim=6, epochs=3) is detector
    assert detector.latent_dim == 6 and detector.epochs == 3
    with pytest.raises(ValueError, match="invalid parameter 'nope'"):
        detector.set_params(nope=1)


def test_clone_copies_parameters_not_fitted_state():
    rng = np.random.default_rng(0)
    fitted = AutoencoderDetector("vae", n_estimators=1, epochs=2).fit(rng.normal(size=(64, 4)))
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert not [name for name in vars(copy) if name.endswith("_")]
    assert clone(AutoencoderDetector()).get_params() == AutoencoderDetector().get_params()


@pytest.mark.filterwarnings("ignore:Estimator AutoencoderDetector does not inherit")
@parametrize_with_checks(
    [AutoencoderDetector("dae", n_estimators=1, epochs=2, device="cpu")],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
