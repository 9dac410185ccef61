"""Training a window monitor: per-entity baselines over the training rows, the
autoencoder on their window inputs, then each entity's calibration.

The training rows run through the same sequential steps as scoring
(:mod:`anomaly_monitor.windows`), entity by entity in id order, from empty states:
the states they end in become the version's states in ``am_entity_states``. The
autoencoder is fitted on the inputs of the older ``1 - holdout`` share of the rows
(leaving out each entity's first ``MIN_BASELINE_SAMPLES``, whose baseline is still
forming); the held-out rows' calibrated scores set the threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from anomaly_monitor.config import MonitorSettings
from anomaly_monitor.windows import (
    MIN_BASELINE_SAMPLES,
    EntityState,
    WindowSpec,
    build_inputs,
    calibrate_scores,
    calibration_range,
    learns,
    model_term,
    score_terms,
)


@dataclass
class StreamFit:
    """A fitted window model's spec, the entities' states after the training rows,
    and the held-out rows' calibrated scores (rows of entities still learning left out)."""

    spec: WindowSpec
    states: dict[str, EntityState]
    held_out_scores: npt.NDArray[np.float64]
    #: Which held-out rows (of ``values[n_fit:]``) the scores are of.
    held_out_rows: npt.NDArray[np.bool_]
    fit_rows: int


def window_spec(monitor: MonitorSettings, features: Sequence[str]) -> WindowSpec:
    """The spec a monitor's settings ask for (calibration range still unset)."""
    assert monitor.window is not None
    return WindowSpec(tuple(features), monitor.window.size, monitor.window.derived,
                      monitor.window.baseline_half_life, monitor.entity_column)


def fit_stream(detector: object, values: npt.NDArray[np.float64], keys: Sequence[str],
               spec: WindowSpec, n_fit: int, ids: npt.NDArray[np.int64], *,
               excluded: npt.NDArray[np.bool_] | None = None) -> StreamFit:
    """Fit ``detector`` (an unfitted ``AutoencoderDetector``) on the window inputs of
    the first ``n_fit`` rows of ``values`` (id order; ``keys``: each row's entity,
    ``ids`` its id). Rows ``excluded`` marks (confirmed anomalies) are the context of
    the rows after them (their entity's baseline and last samples) but are neither
    fitted, nor learned by the entity's calibration, nor among the held-out scores."""
    import pandas as pd

    built = build_inputs(values, keys, {}, spec)
    inputs, before, states = built.inputs, built.before, built.states
    fit_mask = np.zeros(len(values), dtype=bool)
    fit_mask[:n_fit] = True
    fit_mask &= before >= MIN_BASELINE_SAMPLES
    kept = np.ones(len(values), dtype=bool) if excluded is None else ~excluded
    fit_mask &= kept
    if fit_mask.sum() < MIN_BASELINE_SAMPLES:  # few rows per entity: fit on what there is
        fit_mask[:n_fit] = kept[:n_fit]
    detector.fit(pd.DataFrame(inputs[fit_mask], columns=spec.input_names()))  # type: ignore[attr-defined]
    raw = model_term(detector, inputs, spec)
    low, high = calibration_range(raw[fit_mask])
    spec = dataclasses.replace(spec, log_low=low, log_high=high)
    # Every training row seeds the calibration, the fitted ones too (their scores are
    # somewhat lower than unseen rows' would be; seeding from the held-out rows alone
    # cost 3.7 points of NAB score: benchmarks/results/nab.md).
    scores, learning = calibrate_scores(score_terms(raw, built), built, spec,
                                        learn=learns(built) & kept)
    for key, rows in built.groups.items():
        states[key].last_id = int(ids[rows[-1]])
    held = ~learning[n_fit:] & kept[n_fit:]
    if not held.any():  # every entity still learning at the end: keep them all
        held = kept[n_fit:].copy()
    return StreamFit(spec, states, scores[n_fit:][held], held, int(fit_mask.sum()))
