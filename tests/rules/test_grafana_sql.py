"""The dashboard's "Recent incidents" panel: its SQL, with Grafana's macros filled in
as Grafana fills them, runs on the suite's real PostgreSQL and lists incidents with
their labels; the data source it names is provisioned."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import sqlalchemy as sa
import yaml

from anomaly_monitor.db import create_engine
from anomaly_monitor.feedback import label
from tests.helpers import Sensors, drain, insert_rows, trained_plant

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _panel() -> dict:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    (panel,) = [p for p in dashboard["panels"] if p["title"] == "Recent incidents"]
    return panel


def _grafana_sql(raw: str) -> str:
    """The panel's SQL with its macros as bind parameters (Grafana writes the same
    values in as quoted literals)."""
    sql = raw.replace("(${monitor:sqlstring})", ":monitors")  # expanding: (a, b)
    sql = sql.replace("$__timeFilter(i.last_timestamp)",
                      "i.last_timestamp BETWEEN :time_from AND :time_to")
    assert "${" not in sql and "$__" not in sql, sql
    return sql


def test_the_data_source_of_the_panel_is_provisioned():
    panel = _panel()
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "anomaly-monitor-db.yml")
        .read_text())["datasources"]
    (source,) = [d for d in provisioned if d["uid"] == panel["datasource"]["uid"]]
    assert source["type"] == panel["datasource"]["type"] == "grafana-postgresql-datasource"
    assert source["secureJsonData"]["password"].startswith("${")  # from the environment
    assert panel["targets"][0]["format"] == "table"


def test_the_incidents_panel_sql_runs_on_postgresql(pg_url):
    engine = create_engine(pg_url)
    try:
        table, monitor, _, _ = trained_plant(engine)
        with engine.connect() as connection:
            last = connection.execute(sa.select(sa.func.max(table.c.ts))).scalar()
        start = last.replace(tzinfo=dt.UTC) + dt.timedelta(minutes=1)
        insert_rows(engine, table, Sensors(seed=3).anomalous(3), start=start)
        insert_rows(engine, table, Sensors(seed=4).anomalous(2),
                    start=start + dt.timedelta(minutes=30))
        drain(engine, monitor)
        # Grafana writes the monitors in as a list of quoted strings: an expanding list.
        sql = sa.text(_grafana_sql(_panel()["targets"][0]["rawSql"])).bindparams(
            sa.bindparam("monitors", expanding=True))
        now = dt.datetime.now(dt.UTC)
        window = {"time_from": now - dt.timedelta(days=1), "time_to": now + dt.timedelta(days=1)}
        with engine.connect() as connection:
            rows = connection.execute(sql, {"monitors": ["plant"], **window}).mappings().all()
            assert len(rows) == 2 and {r["label"] for r in rows} == {"unlabelled"}
            newest, older = rows
            assert newest["last flag"] > older["last flag"] and newest["rows"] >= 1
            assert set(rows[0]) == {"incident", "monitor", "entity", "state", "first flag",
                                    "last flag", "rows", "max severity", "label", "version"}
            assert connection.execute(sql, {"monitors": ["other", "nope"], **window}).all() == []
            odd = ["plant", "x'); DROP TABLE am_incidents; --"]
            assert len(connection.execute(sql, {"monitors": odd, **window}).all()) == 2
            past = {"time_from": now - dt.timedelta(days=30),
                    "time_to": now - dt.timedelta(days=20)}
            assert connection.execute(sql, {"monitors": ["plant"], **past}).all() == []
        with engine.begin() as connection:
            label(connection, "plant", [older["incident"]], "fp", incident=True, author="ana")
        with engine.connect() as connection:
            labelled = connection.execute(sql, {"monitors": ["plant"], **window}).mappings().all()
        assert [r["label"] for r in labelled] == ["unlabelled", "fp"]
    finally:
        engine.dispose()
