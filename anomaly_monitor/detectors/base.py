"""The estimator contract shared by every detector, and input validation.

Detectors follow scikit-learn's conventions: ``__init__`` stores its keyword
arguments verbatim, ``fit`` validates them and the data and returns ``self``,
and fitted state lives in attributes whose names end in ``_``.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import numpy.typing as npt

#: The fewest rows ``fit`` accepts: fewer cannot give both a training and a validation split.
MIN_FIT_ROWS = 8

FloatMatrix = npt.NDArray[np.float64]


class NotFittedError(ValueError, AttributeError):
    """A method that needs a fitted detector was called before ``fit``."""


class BaseDetector:
    """Parameter handling shared by detectors, compatible with scikit-learn.

    ``get_params`` / ``set_params`` follow scikit-learn's contract, so
    ``sklearn.base.clone`` and parameter searches work; scikit-learn itself is
    not imported unless its tags are asked for (it is not a runtime dependency).
    """

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [
            name
            for name, p in signature.parameters.items()
            if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments of this detector, by name.

        ``deep`` is accepted for scikit-learn compatibility; a detector has no
        nested estimators, so it changes nothing.
        """
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> BaseDetector:
        """Set constructor arguments; unknown names raise ``ValueError``."""
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; "
                    f"valid parameters: {', '.join(sorted(valid))}"
                )
            setattr(self, name, value)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        """Whether ``fit`` has run (scikit-learn's ``check_is_fitted`` asks this)."""
        return any(name.endswith("_") and not name.startswith("_") for name in vars(self))

    def __sklearn_tags__(self) -> Any:
        """scikit-learn tags: an unsupervised estimator of dense, finite, numeric input.

        It is not tagged as an ``outlier_detector``: scikit-learn's outlier
        detectors score lower = more abnormal and predict -1/+1, while these
        detectors follow PyOD's convention (higher = more anomalous).
        """
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(
            estimator_type=None,
            target_tags=TargetTags(required=False),
            transformer_tags=None,
            regressor_tags=None,
            classifier_tags=None,
            input_tags=InputTags(allow_nan=False),
            non_deterministic=False,
            requires_fit=True,
        )

    def __repr__(self) -> str:
        defaults = {
            name: p.default
            for name, p in inspect.signature(type(self).__init__).parameters.items()
        }
        changed = [
            f"{name}={value!r}"
            for name, value in self.get_params().items()
            if defaults.get(name, inspect.Parameter.empty) != value
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


def check_matrix(
    X: Any, *, min_rows: int = 1, what: str = "X"
) -> tuple[FloatMatrix, list[str] | None]:
    """Convert ``X`` (ndarray or DataFrame) to a finite 2-D float64 array.

    Returns the array and the column names when ``X`` is a DataFrame. Raises
    ``ValueError`` naming the problem and, for non-finite values, the first
    offending row and column.
    """
    names: list[str] | None = None
    if hasattr(X, "tocsr") or hasattr(X, "toarray"):
        raise TypeError(f"{what} is sparse; sparse input is not supported (pass X.toarray())")
    if hasattr(X, "columns") and hasattr(X, "to_numpy"):
        from pandas.api.types import is_bool_dtype, is_numeric_dtype

        names = [str(c) for c in X.columns]
        non_numeric = [str(c) for c, dt in zip(X.columns, X.dtypes, strict=True)
                       if not (is_numeric_dtype(dt) or is_bool_dtype(dt))]
        if non_numeric:
            raise ValueError(f"{what} has non-numeric columns: {', '.join(non_numeric)}")
        X = X.to_numpy()
    if np.iscomplexobj(X):
        raise ValueError(f"Complex data not supported: {what} must be real")
    try:
        array = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what} must be numeric: {exc}") from None
    if array.ndim != 2:
        hint = (" Reshape your data: X.reshape(-1, 1) for one feature or X.reshape(1, -1) "
                "for one row." if array.ndim == 1 else "")
        raise ValueError(
            f"{what} must be 2-D (rows x features), got {array.ndim}-D with shape "
            f"{array.shape}.{hint}"
        )
    if array.shape[1] == 0:
        raise ValueError(
            f"{what} has 0 feature(s) (shape={array.shape}) while a minimum of 1 is required."
        )
    if array.shape[0] < min_rows:
        raise ValueError(
            f"{what} has {array.shape[0]} sample(s) (rows); at least {min_rows} are needed"
        )
    finite = np.isfinite(array)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        label = names[col] if names else str(col)
        bad = int((~finite.all(axis=1)).sum())
        raise ValueError(
            f"{what} contains NaN or infinity in {bad} row(s); first at row {row}, "
            f"column {label} (value {array[row, col]})"
        )
    return array, names
