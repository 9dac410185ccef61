"""Window monitors: per-entity baselines, window inputs and per-entity calibration.

No SQL here (``entities.py`` stores the states). A window monitor scores each row
on its own features plus the ``size`` samples of its entity before it, in id order.
Per entity it keeps an :class:`EntityState`:

* a **baseline**, the mean of each feature and its mean absolute deviation from it:
  cumulative over the entity's first ``half_life / ln 2`` samples (a new entity is
  learned from its first samples), exponentially weighted with ``half_life`` (in
  samples) after that, so a level shift that persists becomes the new normal (the
  mean is half-way there after ``half_life`` samples);
* the raw values of its last ``size`` samples: the next row's window (a new entity's
  window is padded with its first sample);
* its **calibration**: two histograms of the log of its two terms (below), decaying
  with the half-life (at least ``CALIBRATION_MIN_HALF_LIFE``).

A row's inputs are its own values and its window's, each scaled by the baseline before
the row, ``z = (x - mean) / sd`` clipped to ``+-Z_CLIP`` (the window's samples, which
are context, to ``+-CONTEXT_CLIP``): a level shift shows both against the window and
against the baseline. With ``derived = ["diff"]`` each sample's change from the one
before, scaled the same way; with ``"spread"`` the log of the window's spread against
the baseline's (a stuck sensor has none). The names say the feature and the lag:
``cpu[t]``, ``cpu[t-3]``, ``cpu.diff[t-1]``, ``cpu.spread[t-32..t]``.

Two terms, higher = more anomalous, become the row's **score** through its entity's
calibration (:func:`calibrate_scores`): the model term (the autoencoder's error on the
row's own sample, :func:`model_term`) and the level term (the row's own largest
deviation from its baseline). Each has a tail probability under the entity's earlier
values of it (empirical, then an exponential tail past its top decile, so that it keeps
falling past the highest value seen), and ``score = -log10(min(1, 2 * min(p1, p2)))``.
A score of 3 means "one of this entity's samples in a thousand scores higher", on
every entity. An entity whose calibration holds less than ``MIN_CALIBRATION_SAMPLES``
samples' weight is still learning: its rows score 0, are never flagged and count as
learning (its first ``MIN_BASELINE_SAMPLES`` rows, while its baseline forms, do not
enter the calibration).

Every step is sequential per entity and independent of how rows are cut into
batches: the same rows after the same state score the same (to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

#: Scaled inputs are clipped to this many baseline deviations.
Z_CLIP = 20.0
#: The samples before a row (its window) are clipped to this many deviations.
CONTEXT_CLIP = 5.0
#: A baseline's deviation is at least this share of its mean's magnitude (plus
#: ``SD_FLOOR_ABSOLUTE``): a sensor that never moved is not infinitely surprising.
SD_FLOOR_RELATIVE = 1e-3
SD_FLOOR_ABSOLUTE = 1e-9
#: The deviation of a normal distribution is this many times its mean absolute deviation.
MAD_TO_SD = math.sqrt(math.pi / 2)
#: ``spread`` inputs are ``log(window sd / baseline sd + SPREAD_FLOOR)``: a stuck sensor
#: (no spread) gives ``log(SPREAD_FLOOR)``.
SPREAD_FLOOR = 1e-2
#: Log-score histogram bins of an entity's calibration.
CALIBRATION_BINS = 128
#: Terms calibrated per entity (:func:`score_terms`).
N_TERMS = 2
#: The level term (``|z|``, at most LEVEL_MAX) and its histogram's range (natural log).
LEVEL_MAX = Z_CLIP
LEVEL_EDGES = np.linspace(math.log(1e-3), math.log(LEVEL_MAX), CALIBRATION_BINS + 1)
#: The histogram's range, in natural-log units around the training scores: from below
#: their 1st percentile to this far above their maximum.
CALIBRATION_HEADROOM = 6.0
#: The calibration histograms' half-life is at least this many samples.
CALIBRATION_MIN_HALF_LIFE = 1000.0
#: Entities with at most this many rows in a batch have their inputs computed together.
FLAT_MAX_ROWS = 256
#: Rows calibrated per vectorised run (bounded memory: rows x bins floats per term).
CALIBRATION_RUN_ROWS = 8192
#: The share of an entity's scores above which its tail is extrapolated.
TAIL_SHARE = 0.1
#: An entity's rows score 0 until it has this many scored samples.
MIN_CALIBRATION_SAMPLES = 50
#: Rows whose entity had fewer samples before them are left out of the fit (their
#: baseline is still forming).
MIN_BASELINE_SAMPLES = 10
#: Scores are floored at this tail probability (a finite ``-log10``).
MIN_TAIL_PROBABILITY = 1e-300


@dataclass(frozen=True)
class WindowSpec:
    """How a version turns a stream into inputs and scores (stored with the version)."""

    features: tuple[str, ...]
    size: int
    derived: tuple[str, ...]
    half_life: float
    entity_column: str | None
    #: The calibration histogram's range (natural log of raw scores).
    log_low: float = -10.0
    log_high: float = 10.0

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def cumulative_samples(self) -> int:
        """Samples over which a new entity's baseline is cumulative before it decays."""
        return max(1, round(self.half_life / math.log(2)))

    @property
    def calibration_half_life(self) -> float:
        """Samples over which an entity's calibration histograms halve their weight:
        the baseline's half-life, at least ``CALIBRATION_MIN_HALF_LIFE`` (a histogram
        of fewer samples cannot tell a 1% tail)."""
        return max(self.half_life, CALIBRATION_MIN_HALF_LIFE)

    @property
    def alpha(self) -> float:
        """The weight of a new sample in an established baseline."""
        return 1.0 - 0.5 ** (1.0 / self.half_life)

    def input_names(self) -> list[str]:
        """The model's inputs: each feature at each lag, oldest first, then its diffs."""
        names = [f"{f}[t-{lag}]" if lag else f"{f}[t]"
                 for f in self.features for lag in range(self.size, -1, -1)]
        if "diff" in self.derived:
            names += [f"{f}.diff[t-{lag}]" if lag else f"{f}.diff[t]"
                      for f in self.features for lag in range(self.size - 1, -1, -1)]
        if "spread" in self.derived:
            names += [f"{f}.spread[t-{self.size}..t]" for f in self.features]
        return names

    def current_columns(self) -> npt.NDArray[np.int64]:
        """The inputs that involve the row's own sample: ``f[t]``, ``f.diff[t]`` and the
        spreads (their reconstruction error is the model term, so that a spike scores
        at its own row and not again at every row whose window holds it)."""
        names = self.input_names()
        return np.array([i for i, name in enumerate(names)
                         if name.endswith("[t]") or ".spread[" in name], dtype=np.int64)

    def edges(self) -> npt.NDArray[np.float64]:
        return np.linspace(self.log_low, self.log_high, CALIBRATION_BINS + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "size": self.size,
                "derived": list(self.derived), "half_life": self.half_life,
                "entity_column": self.entity_column, "log_low": self.log_low,
                "log_high": self.log_high}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowSpec:
        return cls(tuple(data["features"]), int(data["size"]), tuple(data["derived"]),
                   float(data["half_life"]), data.get("entity_column"),
                   float(data["log_low"]), float(data["log_high"]))


@dataclass
class EntityState:
    """One entity's baseline, last samples and calibration (see the module docstring)."""

    samples: int
    mean: npt.NDArray[np.float64]
    #: The running mean absolute deviation from the running mean.
    scale: npt.NDArray[np.float64]
    #: Raw values of the last ``min(samples, size)`` samples, oldest first.
    tail: npt.NDArray[np.float64]
    histogram: npt.NDArray[np.float64]
    #: The id of the last sample the state has learned (``None``: none yet); rows at or
    #: below it are scored without moving the state (``am_entity_states.last_id``).
    last_id: int | None = None

    @classmethod
    def new(cls, spec: WindowSpec) -> EntityState:
        f = spec.n_features
        return cls(0, np.zeros(f), np.zeros(f), np.zeros((0, f)),
                   np.zeros((N_TERMS, CALIBRATION_BINS)))

    def pack(self) -> bytes:
        """Little-endian float64 bytes: samples, tail rows, mean, scale, tail, histogram."""
        head = np.array([self.samples, len(self.tail)], dtype="<f8")
        parts = (head, self.mean, self.scale, self.tail.ravel(), self.histogram.ravel())
        return np.concatenate(parts).astype("<f8").tobytes()

    @classmethod
    def unpack(cls, data: bytes, spec: WindowSpec) -> EntityState:
        if len(data) % 8 or len(data) < 16:
            raise ValueError(f"an entity state of {len(data)} bytes")
        values = np.frombuffer(data, dtype="<f8").astype(np.float64)
        f = spec.n_features
        samples, rows = int(values[0]), int(values[1])
        expected = 2 + 2 * f + rows * f + N_TERMS * CALIBRATION_BINS
        if len(values) != expected or rows > spec.size:
            raise ValueError(f"an entity state of {len(values)} numbers, expected {expected}")
        at = 2
        mean, scale = values[at:at + f], values[at + f:at + 2 * f]
        at += 2 * f
        tail = values[at:at + rows * f].reshape(rows, f)
        return cls(samples, mean.copy(), scale.copy(), tail.copy(),
                   values[at + rows * f:].reshape(N_TERMS, CALIBRATION_BINS).copy())


@dataclass
class Segment:
    """One entity's rows of a batch, scaled: inputs to the model and the new state."""

    inputs: npt.NDArray[np.float64]
    #: Samples the entity had before each row.
    before: npt.NDArray[np.int64]
    state: EntityState
    #: The level term of each row (:func:`score_terms`).
    level: npt.NDArray[np.float64]


@dataclass
class StreamInputs:
    """Rows of a batch (id order) turned into model inputs (:func:`build_inputs`)."""

    inputs: npt.NDArray[np.float64]
    #: Samples each row's entity had before it.
    before: npt.NDArray[np.int64]
    #: The largest unclipped ``|z|`` of each row's own values.
    level: npt.NDArray[np.float64]
    #: The entities' states after the rows (histograms not yet updated).
    states: dict[str, EntityState]
    #: Each entity's row indices.
    groups: dict[str, npt.NDArray[np.int64]]


def _running(values: npt.NDArray[np.float64], n0: int, start: npt.NDArray[np.float64],
             k: int, alpha: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """A running mean of ``values`` (rows in order) after ``n0`` earlier samples whose
    mean was ``start``: cumulative for the first ``k`` rows, then exponentially weighted
    (``alpha``). Its value before each row, and after the last."""
    from scipy.signal import lfilter  # imported when a window monitor scores

    m = len(values)
    before = np.empty_like(values)
    current = start.copy()
    if k:
        ref = current if n0 else values[0]
        sums = n0 * (current - ref) + np.cumsum(values[:k] - ref, axis=0)
        after = ref + sums / (n0 + np.arange(1, k + 1))[:, None]
        before[0] = current if n0 else values[0]
        before[1:k] = after[:-1]
        current = after[-1]
    if k < m:
        zi = ((1 - alpha) * current)[None, :]
        after = lfilter([alpha], [1.0, -(1 - alpha)], values[k:], axis=0, zi=zi)[0]
        before[k] = current
        before[k + 1:] = after[:-1]
        current = after[-1]
    return before, current


def _baseline(x: npt.NDArray[np.float64], state: EntityState, spec: WindowSpec
              ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], EntityState]:
    """The mean and deviation before each row of ``x`` (one entity, id order) and the
    state's baseline after the last row. The deviation is ``MAD_TO_SD`` times the running
    mean absolute deviation from the running mean: a spike moves it in proportion to its
    size, not its square."""
    n0 = state.samples
    k = int(np.clip(spec.cumulative_samples - n0, 0, len(x)))  # rows still cumulative
    mean_before, mean = _running(x, n0, state.mean, k, spec.alpha)
    first = np.abs(x - mean_before)
    if n0 == 0:  # a new entity: its first row has no deviation yet
        first[0] = 0.0
    scale_before, scale = _running(first, n0, state.scale, k, spec.alpha)
    return mean_before, _deviation(scale_before, mean_before), EntityState(
        n0 + len(x), mean, scale, state.tail, state.histogram)


def _deviation(scale: npt.NDArray[np.float64], mean: npt.NDArray[np.float64]
               ) -> npt.NDArray[np.float64]:
    """The baseline's deviation from its running mean absolute deviation and mean."""
    return MAD_TO_SD * scale + SD_FLOOR_RELATIVE * np.abs(mean) + SD_FLOOR_ABSOLUTE


def _features(windows: npt.NDArray[np.float64], mean: npt.NDArray[np.float64],
              sd: npt.NDArray[np.float64], spec: WindowSpec
              ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The inputs and level terms of rows from their windows (rows, size + 1, features;
    oldest first, the row itself last) and the baseline before each row."""
    m, _, f = windows.shape
    unclipped = (windows - mean[:, None, :]) / sd[:, None, :]
    level = np.minimum(np.abs(unclipped[:, -1, :]).max(axis=1), LEVEL_MAX)
    z = np.clip(unclipped, -Z_CLIP, Z_CLIP)
    # Earlier samples are context: clipped tighter, so that one spike does not make the
    # rows after it look anomalous while it is in their windows.
    z[:, :-1, :] = np.clip(z[:, :-1, :], -CONTEXT_CLIP, CONTEXT_CLIP)
    parts = [z.transpose(0, 2, 1).reshape(m, f * (spec.size + 1))]
    if "diff" in spec.derived:
        diffs = np.clip(np.diff(windows, axis=1) / sd[:, None, :], -Z_CLIP, Z_CLIP)
        diffs[:, :-1, :] = np.clip(diffs[:, :-1, :], -CONTEXT_CLIP, CONTEXT_CLIP)
        parts.append(diffs.transpose(0, 2, 1).reshape(m, f * spec.size))
    if "spread" in spec.derived:  # log of the window's spread against the baseline's
        spread = windows.std(axis=1) / sd
        parts.append(np.log(spread + SPREAD_FLOOR))
    return np.concatenate(parts, axis=1), level


def _padded_tail(state: EntityState, first: npt.NDArray[np.float64], size: int
                 ) -> npt.NDArray[np.float64]:
    """The ``size`` samples before an entity's next row, padded with its oldest known
    sample (a new entity's first row: ``first``)."""
    tail = state.tail if len(state.tail) else first[None, :]
    tail = tail[max(0, len(tail) - size):] if size else tail[:0]
    if len(tail) < size:
        tail = np.vstack([np.repeat(tail[:1], size - len(tail), axis=0), tail])
    return tail


def segment_inputs(x: npt.NDArray[np.float64], state: EntityState, spec: WindowSpec
                   ) -> Segment:
    """The model inputs of one entity's rows ``x`` (id order) after ``state``; the
    returned state has the new baseline and tail (its histogram is not updated yet)."""
    m = len(x)
    mean_b, sd, new = _baseline(x, state, spec)
    full = np.vstack([_padded_tail(state, x[0], spec.size), x])
    # windows[j, l] = sample at lag (size - l) for l < size, the row itself at l = size
    windows = full[np.arange(m)[:, None] + np.arange(spec.size + 1)[None, :]]
    inputs, level = _features(windows, mean_b, sd, spec)
    new.tail = full[len(full) - spec.size:].copy()
    before = state.samples + np.arange(m, dtype=np.int64)
    return Segment(inputs, before, new, level)


def _flat_running(values: npt.NDArray[np.float64], local: npt.NDArray[np.int64],
                  segment: npt.NDArray[np.int64], first: npt.NDArray[np.int64],
                  ends: npt.NDArray[np.int64], n0: npt.NDArray[np.int64],
                  start: npt.NDArray[np.float64], cumulative: npt.NDArray[np.bool_],
                  ref: npt.NDArray[np.float64], alpha: float
                  ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """:func:`_running` for many entities at once (rows entity after entity): each
    entity's segment wholly cumulative (``cumulative``) or wholly weighted."""
    keep = 1.0 - alpha
    cum_seg = cumulative[segment]
    # cumulative: (n0 (start - ref) + sum of (x - ref) before) / (n0 + j), shifted by ref
    shifted = values - ref[segment]
    # weighted: keep**j (start + alpha * sum_i<j keep**-(i+1) x_i)
    grow = keep ** -(local + 1.0)
    weighted = np.where(cum_seg[:, None], shifted, values * grow[:, None])
    sums = np.cumsum(weighted, axis=0)
    base = sums[first] - weighted[first]
    before_sum = sums - weighted - base[segment]
    total = sums[ends] - base
    count = np.maximum(n0[segment] + local, 1)[:, None]
    cum_before = ref[segment] + (n0[segment, None] * (start - ref)[segment] + before_sum) / count
    ew_before = keep ** local[:, None] * (start[segment] + alpha * before_sum)
    before = np.where(cum_seg[:, None], cum_before, ew_before)
    lengths = (ends - first + 1)
    cum_after = ref + (n0[:, None] * (start - ref) + total) / np.maximum(n0 + lengths, 1)[:, None]
    ew_after = keep ** lengths[:, None] * (start + alpha * total)
    return before, np.where(cumulative[:, None], cum_after, ew_after)


def _flat_inputs(x: npt.NDArray[np.float64], lengths: npt.NDArray[np.int64],
                 states: list[EntityState], spec: WindowSpec
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                            npt.NDArray[np.int64], list[EntityState]]:
    """Inputs, level terms and samples-before of rows of many entities at once (``x``:
    entity after entity, each entity's rows in id order), and the states after."""
    n = len(x)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    ends = first + lengths - 1
    segment = np.repeat(np.arange(len(lengths)), lengths)
    local = np.arange(n) - first[segment]
    n0 = np.array([s.samples for s in states], dtype=np.int64)
    cumulative = n0 + lengths <= spec.cumulative_samples
    mean0 = np.stack([s.mean for s in states])
    scale0 = np.stack([s.scale for s in states])
    ref = np.where((n0 > 0)[:, None], mean0, x[first])
    mean_b, mean = _flat_running(x, local, segment, first, ends, n0, mean0, cumulative, ref,
                                 spec.alpha)
    deviations = np.abs(x - mean_b)
    fresh = (n0[segment] == 0) & (local == 0)  # a new entity's first row
    deviations[fresh] = 0.0
    scale_b, scale = _flat_running(deviations, local, segment, first, ends, n0, scale0,
                                   cumulative, np.zeros_like(scale0), spec.alpha)
    sd = _deviation(scale_b, mean_b)
    tails = [_padded_tail(s, x[a], spec.size) for s, a in zip(states, first, strict=True)]
    extended = np.concatenate([part for i, tail in enumerate(tails)
                               for part in (tail, x[first[i]:ends[i] + 1])])
    offset = first + spec.size * np.arange(len(lengths))  # where each padded tail starts
    windows = extended[(offset[segment] + local)[:, None] + np.arange(spec.size + 1)[None, :]]
    inputs, level = _features(windows, mean_b, sd, spec)
    after = [EntityState(int(n0[i] + lengths[i]), mean[i], scale[i],
                         extended[offset[i] + lengths[i]:offset[i] + lengths[i] + spec.size]
                         .copy(), states[i].histogram)
             for i in range(len(lengths))]
    return inputs, level, n0[segment] + local, after


def group_rows(entities: Sequence[str]) -> dict[str, npt.NDArray[np.int64]]:
    """The row indices of each entity, in row order (entities in order of first row)."""
    keys = np.asarray(entities, dtype=object)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}


def build_inputs(values: npt.NDArray[np.float64], entities: Sequence[str],
                 states: dict[str, EntityState], spec: WindowSpec) -> StreamInputs:
    """Model inputs for rows in id order (``entities``: each row's key) after
    ``states`` (absent keys: new entities). Entities with at most ``FLAT_MAX_ROWS`` rows
    (and ``half_life``) in the batch, all in one phase of their baseline, are computed
    together (:func:`_flat_inputs`), the others one by one: the same numbers up to
    float rounding (the weights of a run grow at most two-fold)."""
    groups = group_rows(entities)
    inputs = np.empty((len(values), len(spec.input_names())))
    before = np.empty(len(values), dtype=np.int64)
    level = np.empty(len(values))
    after: dict[str, EntityState] = {}
    together: list[str] = []
    for key, rows in groups.items():
        state = states.get(key) or EntityState.new(spec)
        ends_at = state.samples + len(rows)
        short = len(rows) <= min(FLAT_MAX_ROWS, spec.half_life)
        if short and (ends_at <= spec.cumulative_samples
                      or state.samples >= spec.cumulative_samples):
            together.append(key)
            continue
        seg = segment_inputs(values[rows], state, spec)
        inputs[rows], before[rows], level[rows] = seg.inputs, seg.before, seg.level
        after[key] = seg.state
    if together:
        rows = np.concatenate([groups[k] for k in together])
        flat = _flat_inputs(values[rows], np.array([len(groups[k]) for k in together]),
                            [states.get(k) or EntityState.new(spec) for k in together], spec)
        inputs[rows], level[rows], before[rows] = flat[0], flat[1], flat[2]
        after.update(zip(together, flat[3], strict=True))
    return StreamInputs(inputs, before, level, after, groups)


def model_term(detector: Any, inputs: npt.NDArray[np.float64], spec: WindowSpec
               ) -> npt.NDArray[np.float64]:
    """The model's raw score of each row: the part of the autoencoder's score
    (``feature_errors``, higher = more anomalous) on the inputs of the row's own sample,
    its window serving as context (:meth:`WindowSpec.current_columns`)."""
    if len(inputs) == 0:
        return np.zeros(0)
    shares = detector.feature_errors(inputs)
    return shares[:, spec.current_columns()].sum(axis=1) + 1e-12


def score_terms(raw: npt.NDArray[np.float64], built: StreamInputs) -> npt.NDArray[np.float64]:
    """The terms each entity calibrates, one column each: the model's raw score, and
    the level term, the largest deviation of the row's own values from their baseline
    (``max |z|`` over the features, up to ``LEVEL_MAX``: beyond that many deviations a
    sample is as surprising as it gets, so that one series' normal spikes do not
    outrank other series' anomalies on a shared threshold)."""
    return np.column_stack([raw, built.level])


def learns(built: StreamInputs) -> npt.NDArray[np.bool_]:
    """Which rows join their entities' calibration: not the first
    ``MIN_BASELINE_SAMPLES`` of an entity (its baseline is still forming).

    Anomalous rows do join it: a persisting change is flagged at its start and then
    stops being surprising within tens of samples, before the baseline has moved to it
    (leaving rows over 6 deviations out, so that the change stays flagged until the
    baseline follows, cost 23 points of NAB score: ``benchmarks/results/nab.md``)."""
    return built.before >= MIN_BASELINE_SAMPLES


def calibrate_scores(terms: npt.NDArray[np.float64], built: StreamInputs, spec: WindowSpec,
                     *, update: bool = True, learn: npt.NDArray[np.bool_] | None = None
                     ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Each row's score: ``-log10(min(1, T * min_t p_t))`` over its ``T`` terms
    (:func:`score_terms`), ``p_t`` the tail probability of term ``t`` under its entity's
    earlier values of it (a histogram decaying with the half-life); 0 while the entity
    is learning (its histograms hold less than ``MIN_CALIBRATION_SAMPLES`` samples'
    weight before the row). The rows ``learn`` marks (default :func:`learns`) join
    their entities' histograms; with ``update`` those move on in ``built.states``.
    Returns the scores and which rows were learning.

    All entities at once: the rows, entity by entity, are cut into runs of at most
    ``CALIBRATION_RUN_ROWS`` (and the calibration half-life, so that the decay weights
    stay within a factor of two), each run carrying on from the histograms the previous
    one left."""
    keys = list(built.groups)
    if not keys:
        return np.zeros(0), np.zeros(0, dtype=bool)
    learn = learns(built) if learn is None else learn
    lengths = np.array([len(built.groups[k]) for k in keys])
    flat = np.concatenate([built.groups[k] for k in keys])
    group = np.repeat(np.arange(len(keys)), lengths)
    histograms = np.stack([built.states[k].histogram for k in keys])  # (G, T, B)
    edges = [spec.edges(), LEVEL_EDGES][:terms.shape[1]]
    half_life = spec.calibration_half_life
    decay = 0.5 ** (1.0 / half_life)
    run = max(1, min(CALIBRATION_RUN_ROWS, int(half_life)))
    p = np.ones(len(flat))
    weight = np.zeros(len(flat))
    for start in range(0, len(flat), run):
        part = slice(start, start + run)
        rows, g = flat[part], group[part]
        starts = np.r_[True, g[1:] != g[:-1]]
        first = np.flatnonzero(starts)  # where each entity's rows in the run begin
        segment = np.cumsum(starts) - 1
        local = np.arange(len(rows)) - first[segment]
        for t, term_edges in enumerate(edges):
            term_p, weight[part] = _run_probability(
                terms[rows, t], learn[rows], local, first, segment, g[first], histograms, t,
                term_edges, decay)
            p[part] = np.minimum(p[part], term_p)
    combined = np.clip(terms.shape[1] * p, MIN_TAIL_PROBABILITY, 1.0)
    scores, learning = np.zeros(len(terms)), np.zeros(len(terms), dtype=bool)
    learning[flat] = weight < MIN_CALIBRATION_SAMPLES
    scores[flat] = np.where(learning[flat], 0.0, -np.log10(combined))
    if update:
        for index, key in enumerate(keys):
            built.states[key].histogram = histograms[index]
    return scores, learning


def _run_probability(values: npt.NDArray[np.float64], learn: npt.NDArray[np.bool_],
                     local: npt.NDArray[np.int64], first: npt.NDArray[np.int64],
                     segment: npt.NDArray[np.int64], owners: npt.NDArray[np.int64],
                     histograms: npt.NDArray[np.float64], term: int,
                     edges: npt.NDArray[np.float64], decay: float
                     ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Tail probabilities of one term over one run of rows (entity after entity, each
    entity's rows in order, ``local`` their index among them), each under its entity's
    histogram before it (each row decays it by ``decay``, then adds itself if
    ``learn``), and that histogram's weight; the entities' histograms of ``term`` move
    on to after the run (in place)."""
    width = edges[1] - edges[0]
    centers = (edges[:-1] + edges[1:]) / 2
    r = np.log(np.maximum(values, 1e-300))
    bins = np.clip(((r - edges[0]) / width).astype(np.int64), 0, CALIBRATION_BINS - 1)
    n = len(values)
    onehot = np.zeros((n, CALIBRATION_BINS))
    onehot[np.arange(n), bins] = np.where(learn, decay ** -(local + 1.0), 0.0)
    cumulative = np.cumsum(onehot, axis=0)
    base = cumulative[first] - onehot[first]  # the sums before each entity's rows
    start = histograms[owners, term]  # (entities in the run, B)
    added = cumulative - base[segment]
    counts = decay ** local[:, None] * (start[segment] + added - onehot)
    ends = np.r_[first[1:], n] - 1
    histograms[owners, term] = decay ** (local[ends] + 1.0)[:, None] * (start + added[ends])
    return _tail_probability(r, bins, counts, edges, centers, width), counts.sum(axis=1)


def _tail_probability(r: npt.NDArray[np.float64], bins: npt.NDArray[np.int64],
                      counts: npt.NDArray[np.float64], edges: npt.NDArray[np.float64],
                      centers: npt.NDArray[np.float64], width: float
                      ) -> npt.NDArray[np.float64]:
    """P(term >= r) under the histograms ``counts`` (one per row): empirical, with an
    exponential tail fitted to the top ``TAIL_SHARE``."""
    total = counts.sum(axis=1)
    above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # mass in bins >= b
    n = len(r)
    rows = np.arange(n)
    above_next = np.where(bins + 1 < counts.shape[1],
                          above[rows, np.minimum(bins + 1, counts.shape[1] - 1)], 0.0)
    inside = np.clip((edges[bins + 1] - r) / width, 0.0, 1.0)
    empirical = (above_next + inside * counts[rows, bins]) / np.maximum(total, 1.0)
    # the tail: from the first bin whose mass above is at most TAIL_SHARE of the total
    small = above <= TAIL_SHARE * total[:, None]
    tail_bin = np.where(small.any(axis=1), small.argmax(axis=1), counts.shape[1] - 1)
    u = edges[tail_bin]
    in_tail = np.arange(counts.shape[1])[None, :] >= tail_bin[:, None]
    tail_mass = np.maximum((counts * in_tail).sum(axis=1), 1e-12)
    excess = (counts * in_tail * (centers[None, :] - u[:, None])).sum(axis=1) / tail_mass
    beta = np.maximum(excess, width / 2)
    extrapolated = tail_mass / np.maximum(total, 1.0) * np.exp(np.minimum(0.0, -(r - u) / beta))
    return np.clip(np.where(r > u, extrapolated, empirical), MIN_TAIL_PROBABILITY, 1.0)


def calibration_range(raw: npt.NDArray[np.float64]) -> tuple[float, float]:
    """The histogram range for a version from its training raw scores."""
    logs = np.log(np.maximum(raw, 1e-300))
    low = float(np.quantile(logs, 0.01)) - 1.0
    high = float(logs.max()) + CALIBRATION_HEADROOM
    return low, max(high, low + 1.0)
