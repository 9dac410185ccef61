"""Synthetic sensor telemetry: correlated sensors driven by a few latent factors.

Each family has ``n_sensors`` sensors measuring ``n_factors`` latent factors
through a random mixing matrix, a mild per-sensor nonlinearity (sensors
saturate) and independent noise. Anomalies are the faults seen in plant
telemetry that an autoencoder exists for, each keeping every sensor inside its
normal range or close to it:

- ``permuted``: a few sensors take their values from another, independent
  normal row, so every marginal stays normal but the correlations break;
- ``stuck``: one sensor reads a value drawn from its normal range (between its
  10th and 90th percentiles) regardless of the others, as a stuck sensor does
  while the plant moves;
- ``spike``: one sensor jumps by 4-8 standard deviations.

The generator is seeded and pure (numpy only) so that tests and benchmarks
share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

ANOMALY_KINDS: tuple[str, ...] = ("permuted", "stuck", "spike")
#: Standard deviation of the sensor noise, relative to the signal of a unit factor.
NOISE_LEVEL = 0.1
#: Share of each sensor's response that passes through a saturating tanh.
NONLINEAR_SHARE = 0.3


@dataclass(frozen=True)
class Family:
    """One telemetry family: its size and how many latent factors drive it."""

    n_sensors: int
    n_factors: int

    @property
    def name(self) -> str:
        """A short name, e.g. ``telemetry_12x4``."""
        return f"telemetry_{self.n_sensors}x{self.n_factors}"


#: The families the quality benchmark measures: 8 to 64 sensors, 2 to 12 factors.
FAMILIES: tuple[Family, ...] = (
    Family(8, 2), Family(12, 4), Family(16, 3), Family(24, 6),
    Family(32, 8), Family(48, 10), Family(64, 12),
)


def normal_rows(
    family: Family, n_rows: int, rng: np.random.Generator, mixing: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """``n_rows`` normal readings of ``family`` under the sensors' ``mixing`` matrix."""
    factors = rng.standard_normal((n_rows, family.n_factors))
    linear = factors @ mixing
    signal = (1.0 - NONLINEAR_SHARE) * linear + NONLINEAR_SHARE * np.tanh(linear)
    return signal + NOISE_LEVEL * rng.standard_normal((n_rows, family.n_sensors))


def make_family(
    family: Family, *, n_rows: int = 6000, anomaly_rate: float = 0.05, seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.str_]]:
    """Rows, labels (1 = anomaly) and each anomaly's kind (``""`` for normal rows)."""
    rng = np.random.default_rng([seed, family.n_sensors, family.n_factors])
    mixing = rng.normal(size=(family.n_factors, family.n_sensors)) / np.sqrt(family.n_factors)
    x = normal_rows(family, n_rows, rng, mixing)
    donors = normal_rows(family, n_rows, rng, mixing)
    n_anomalies = round(anomaly_rate * n_rows)
    rows = rng.choice(n_rows, size=n_anomalies, replace=False)
    kinds = np.full(n_rows, "", dtype="<U8")
    kinds[rows] = rng.choice(ANOMALY_KINDS, size=n_anomalies)
    scale = x.std(axis=0)
    low, high = np.quantile(x, [0.1, 0.9], axis=0)
    for row in rows:
        if kinds[row] == "permuted":
            count = max(2, family.n_sensors // 6)
            sensors = rng.choice(family.n_sensors, size=count, replace=False)
            x[row, sensors] = donors[row, sensors]
        elif kinds[row] == "stuck":
            sensor = int(rng.integers(family.n_sensors))
            x[row, sensor] = rng.uniform(low[sensor], high[sensor])
        else:
            sensor = int(rng.integers(family.n_sensors))
            x[row, sensor] += rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 8.0) * scale[sensor]
    labels = (kinds != "").astype(np.int64)
    return x, labels, kinds
