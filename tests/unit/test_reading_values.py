"""Conversion of raw driver values: every row is scorable or quarantined with a reason."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from anomaly_monitor.reading.values import REASONS, json_value, to_matrix, to_timestamp

NAMES = ("a", "b", "c")


def test_reasons_for_each_kind_of_bad_value():
    rows = [(1.0, 2, Decimal("3.5")), (None, 1.0, 1.0), (1.0, float("nan"), 1.0),
            (1.0, 1.0, float("-inf")), ("abc", 1.0, 1.0), (True, 0, 1)]
    matrix, bad, reasons = to_matrix(rows, NAMES)
    assert bad == [1, 2, 3, 4]
    assert [r[0] for r in reasons] == ["null", "nan", "infinite", "non_numeric"]
    assert "a: str 'abc'" in reasons[3][1]
    np.testing.assert_array_equal(matrix[0], [1.0, 2.0, 3.5])
    np.testing.assert_array_equal(matrix[5], [1.0, 0.0, 1.0])
    assert reasons[0][2] == {"a": None, "b": 1.0, "c": 1.0}
    assert reasons[1][2]["b"] == "nan"


values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                   st.integers(-(2**62), 2**62), st.text(max_size=5), st.booleans())


@given(st.lists(st.tuples(values, values, values), min_size=1, max_size=20))
def test_every_row_is_either_finite_or_quarantined(rows):
    matrix, bad, reasons = to_matrix(rows, NAMES)
    good = np.setdiff1d(np.arange(len(rows)), bad)
    assert np.isfinite(matrix[good]).all()
    assert all(r[0] in REASONS for r in reasons)
    assert len(bad) == len(reasons)


def test_timestamps_from_several_representations():
    expected = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert to_timestamp(expected.replace(tzinfo=None)) == expected
    assert to_timestamp(expected.timestamp()) == expected
    assert to_timestamp("2026-01-02T03:04:05+00:00") == expected
    assert to_timestamp(dt.date(2026, 1, 2)) == expected.replace(hour=0, minute=0, second=0)
    assert to_timestamp("not a time") is None and to_timestamp(float("nan")) is None


def test_json_values_are_serialisable():
    assert json_value(float("inf")) == "inf" and json_value(Decimal("1.5")) == 1.5
    assert json_value(b"\x00\x01") == "0001" and json_value(None) is None
