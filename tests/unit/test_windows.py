"""Window inputs, per-entity baselines and calibration (anomaly_monitor.windows)."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_monitor.windows import (
    MIN_CALIBRATION_SAMPLES,
    EntityState,
    StreamInputs,
    WindowSpec,
    build_inputs,
    calibrate_scores,
    score_terms,
    segment_inputs,
)


def spec(**overrides) -> WindowSpec:
    base = {"features": ("cpu", "mem"), "size": 4, "derived": ("diff", "spread"),
            "half_life": 50.0, "entity_column": "host", "log_low": -6.0, "log_high": 6.0}
    base.update(overrides)
    return WindowSpec(**base)


def toy_raw(inputs: np.ndarray) -> np.ndarray:
    """A stand-in model score: the size of the inputs (higher = more anomalous)."""
    return np.sqrt((inputs ** 2).mean(axis=1)) + 1e-3


def score(values, keys, states, s):
    built = build_inputs(values, keys, states, s)
    scores, _ = calibrate_scores(score_terms(toy_raw(built.inputs), built), built, s)
    return built, scores


def test_input_names_carry_feature_and_lag():
    names = spec(size=2).input_names()
    assert names == ["cpu[t-2]", "cpu[t-1]", "cpu[t]", "mem[t-2]", "mem[t-1]", "mem[t]",
                     "cpu.diff[t-1]", "cpu.diff[t]", "mem.diff[t-1]", "mem.diff[t]",
                     "cpu.spread[t-2..t]", "mem.spread[t-2..t]"]
    assert spec(size=2, derived=()).input_names()[:3] == ["cpu[t-2]", "cpu[t-1]", "cpu[t]"]


def test_scores_do_not_depend_on_how_rows_are_cut_into_batches():
    rng = np.random.default_rng(0)
    s = spec()
    values = rng.normal(10, 2, (400, 2))
    keys = [f"h{i % 3}" for i in range(400)]
    whole, whole_scores = score(values, keys, {}, s)
    states: dict[str, EntityState] = {}
    parts, part_scores = [], []
    for a, b in [(0, 1), (1, 9), (9, 250), (250, 400)]:
        built, scores = score(values[a:b], keys[a:b], states, s)
        states = {**states, **built.states}
        # a state survives its bytes (what am_entity_states stores)
        states = {k: EntityState.unpack(v.pack(), s) for k, v in states.items()}
        parts.append(built.inputs)
        part_scores.append(scores)
    np.testing.assert_allclose(np.vstack(parts), whole.inputs, atol=1e-9)
    np.testing.assert_allclose(np.concatenate(part_scores), whole_scores, atol=1e-9)
    for key, state in whole.states.items():
        np.testing.assert_allclose(states[key].histogram, state.histogram, atol=1e-9)
        assert states[key].samples == state.samples


def test_a_state_of_the_wrong_shape_is_refused():
    s = spec()
    data = EntityState.new(s).pack()
    with pytest.raises(ValueError, match="entity state"):
        EntityState.unpack(data[:-8], s)


def test_each_entity_has_its_own_baseline():
    """100 is normal for host b and far off for host a: only a's row is surprising."""
    rng = np.random.default_rng(1)
    s = spec(features=("cpu",), derived=(), size=2)
    n = 600
    values = np.where(np.arange(n)[:, None] % 2 == 0, rng.normal(10, 1, (n, 1)),
                      rng.normal(100, 1, (n, 1)))
    keys = ["a" if i % 2 == 0 else "b" for i in range(n)]
    built, _ = score(values, keys, {}, s)
    probe, scores = score(np.array([[100.0], [100.0]]), ["a", "b"], built.states, s)
    assert probe.level[0] == 20.0 and probe.level[1] < 3  # 20: LEVEL_MAX
    assert scores[0] > 3 > 1 > scores[1]


def test_a_new_entity_is_learned_from_its_first_samples():
    rng = np.random.default_rng(2)
    s = spec(features=("cpu",), derived=(), size=2)
    values = rng.normal(5, 1, (200, 1))
    built, scores = score(values, ["new"] * 200, {}, s)
    assert (scores[:MIN_CALIBRATION_SAMPLES] == 0).all()  # still learning: never flagged
    assert scores[MIN_CALIBRATION_SAMPLES:].max() > 0
    assert built.states["new"].mean[0] == pytest.approx(5, abs=0.5)


def test_the_calibration_is_a_tail_probability():
    """On an entity's own i.i.d. scores, a threshold of 2 flags about 1% of its rows."""
    rng = np.random.default_rng(3)
    s = spec(features=("v",), derived=(), size=0, half_life=2000.0, log_low=-5, log_high=5)
    n = 30000
    terms = np.column_stack([np.exp(rng.normal(0, 1, n)), np.abs(rng.normal(0, 1, n))])
    built = StreamInputs(np.zeros((n, 1)), np.arange(n), terms[:, 1],
                         {"e": EntityState.new(s)}, {"e": np.arange(n)})
    scores, _ = calibrate_scores(terms, built, s)
    rate = (scores[3000:] > 2).mean()
    assert 0.003 < rate < 0.025
    # far beyond every earlier score, the score keeps rising (the tail is extrapolated)
    probe = StreamInputs(np.zeros((2, 1)), np.full(2, n), np.ones(2), built.states,
                         {"e": np.arange(2)})
    far, _ = calibrate_scores(np.array([[1e4, 1.0], [1e8, 1.0]]), probe, s, update=False)
    assert 5 < far[0] < far[1]


def test_a_level_shift_becomes_the_new_normal():
    """After a persisting shift of 10 deviations, the row's own deviation from its
    baseline falls below 3 within a few half-lives, without any retraining."""
    rng = np.random.default_rng(4)
    half_life = 100.0
    s = spec(features=("v",), derived=(), size=2, half_life=half_life)
    before = rng.normal(0, 1, (1000, 1))
    after = rng.normal(10, 1, (2000, 1))
    built, _ = score(np.vstack([before, after]), ["e"] * 3000, {}, s)
    level = built.level[1000:]
    assert level[0] > 6
    settled = int(np.argmax(np.convolve(level < 3, np.ones(50), "valid") == 50))
    assert 0 < settled < 6 * half_life


def test_a_stuck_sensor_shows_in_its_spread():
    rng = np.random.default_rng(5)
    s = spec(features=("v",), derived=("spread",), size=8)
    values = np.vstack([rng.normal(0, 1, (500, 1)), np.full((20, 1), 0.3)])
    built, _ = score(values, ["e"] * 520, {}, s)
    spread = built.inputs[:, -1]
    assert spread[-1] < np.log(0.05) < spread[50:500].min()  # after the first samples


def test_many_entities_together_give_the_numbers_of_one_at_a_time():
    """build_inputs computes entities in one phase of their baseline together; the
    others one by one (segment_inputs): the same inputs and states either way."""
    rng = np.random.default_rng(6)
    s = spec(half_life=20.0)  # cumulative over 29 samples: both phases in the batches
    x = rng.normal(5, 2, (900, 2)) * 40
    keys = [f"e{int(k)}" for k in rng.integers(0, 12, 900)]
    states: dict[str, EntityState] = {}
    for a, b in [(0, 50), (50, 300), (300, 310), (310, 900)]:
        built = build_inputs(x[a:b], keys[a:b], states, s)
        for key, rows in built.groups.items():
            one = segment_inputs(x[a:b][rows], states.get(key) or EntityState.new(s), s)
            np.testing.assert_allclose(built.inputs[rows], one.inputs, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(built.states[key].mean, one.state.mean, rtol=1e-9)
            np.testing.assert_allclose(built.states[key].scale, one.state.scale, rtol=1e-9)
            np.testing.assert_allclose(built.states[key].tail, one.state.tail)
            assert built.states[key].samples == one.state.samples
        states = built.states


def test_a_short_stored_tail_keeps_all_its_samples():
    """A stored tail shorter than the window is padded before its oldest sample, not
    cut to its last one (states written by a smaller window, or by a future writer
    that stores only the samples seen)."""
    s = spec(derived=())
    state = EntityState.new(s)
    state.samples, state.mean, state.scale = 3, np.array([2.0, 2.0]), np.array([0.7, 0.7])
    state.tail = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    segment = segment_inputs(np.array([[4.0, 4.0]]), state, s)
    assert segment.state.tail[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
