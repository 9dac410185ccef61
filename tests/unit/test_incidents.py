"""Grouping flags into incidents (anomaly_monitor.incidents.group), without a database."""

from __future__ import annotations

import datetime as dt
import itertools

from anomaly_monitor.incidents import feature_name, group, sample_interval, top_features

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NOW = T0 + dt.timedelta(days=1)


def flag(source_id: int, minute: float | None, entity: str | None = None,
         severity: float = 50.0, feature: str = "cpu[t]") -> dict:
    when = None if minute is None else T0 + dt.timedelta(minutes=minute)
    return {"source_id": source_id, "source_timestamp": when, "entity": entity,
            "severity": severity, "model_version": 1,
            "contributions": [{"feature": feature, "share": 0.5, "value": 1.0}]}


def spans(flags, stored=(), gap_minutes=3.0):
    result = group(flags, list(stored), monitor="m", generation=0,
                   gap_seconds=60 * gap_minutes, now=NOW)
    return sorted(sorted(f["source_id"] for f in i.flags) for i in result.touched), result


def test_flags_within_the_gap_are_one_incident():
    found, result = spans([flag(1, 0), flag(2, 1), flag(3, 4), flag(4, 8)])
    assert found == [[1, 2, 3], [4]]  # 4 - 1 <= 3 minutes; 8 - 4 > 3
    first = next(i for i in result.touched if len(i.flags) == 3).row
    assert first["rows"] == 3 and (first["first_source_id"], first["last_source_id"]) == (1, 3)
    assert first["first_timestamp"] == T0
    assert first["last_timestamp"] == T0 + dt.timedelta(minutes=4)


def test_entities_are_grouped_apart():
    found, _ = spans([flag(1, 0, "a"), flag(2, 0, "b"), flag(3, 1, "a")])
    assert found == [[1, 3], [2]]


def test_the_result_does_not_depend_on_the_order_of_scoring():
    """A late flag between two incidents merges them into the older one: the groups are
    the runs of all the flags, whatever order they came in."""
    flags = [flag(1, 0), flag(2, 2), flag(3, 7), flag(4, 9), flag(5, 4.5), flag(6, 20)]
    for order in itertools.permutations(range(len(flags)), 3):
        stored: list[dict] = []
        next_id = 1
        for i in order:  # three batches of one flag, then the rest in one
            _, result = spans([flags[i]], stored)
            for incident in result.touched:
                if incident.row["id"] is None:
                    incident.row["id"], next_id = next_id, next_id + 1
            stored = [s for s in stored if s["id"] not in result.merged
                      and s["id"] not in {t.row["id"] for t in result.touched}]
            stored += [t.row for t in result.touched]
        rest = [flags[i] for i in range(len(flags)) if i not in order]
        _, result = spans(rest, stored)
        touched = {id(t.row) for t in result.touched}
        final = [s for s in stored if s["id"] not in result.merged
                 and s["id"] not in {t.row["id"] for t in result.touched}]
        final += [t.row for t in result.touched]
        assert len(touched) == len(result.touched)
        assert sorted((r["first_source_id"], r["rows"]) for r in final) == \
            [(1, 5), (6, 1)], order


def test_a_flag_without_a_timestamp_joins_the_newest_open_incident_only():
    found, _ = spans([flag(1, 0), flag(2, None)])
    assert found == [[1, 2]]
    stored = [{"id": i, "monitor": "m", "generation": 0, "entity": None,
               "first_source_id": i, "last_source_id": i, "rows": 1, "max_severity": 50.0,
               "first_timestamp": T0 + dt.timedelta(minutes=m),
               "last_timestamp": T0 + dt.timedelta(minutes=m), "feature_shares": {},
               "state": "open", "label": None, "model_version": 1, "opened_at": NOW,
               "updated_at": NOW, "closed_at": None} for i, m in ((1, 0), (2, 100))]
    _, result = spans([flag(3, None)], stored)
    assert result.merged == {} and [t.row["id"] for t in result.touched] == [2]


def test_summaries():
    assert feature_name("cpu[t-3]") == "cpu" and feature_name("cpu.diff[t]") == "cpu.diff"
    assert feature_name("f0") == "f0"
    assert top_features({"a": 1.0, "b": 3.0, "c": 0.5, "d": 2.0}, 2) == [
        {"feature": "b", "share": 1.5}, {"feature": "d", "share": 1.0},
        {"feature": "a", "share": 0.5}]
    assert sample_interval(101, T0, T0 + dt.timedelta(minutes=100)) == 60.0
    assert sample_interval(1, T0, T0) is None and sample_interval(10, None, T0) is None
