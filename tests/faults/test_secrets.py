"""The database password never appears in output or logs, and hostile identifiers from the
config are rejected before any query runs."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from anomaly_monitor.db import create_engine
from tests.helpers import FEATURES, Sensors, bulk_insert, source_table
from tests.pgserver import free_port

PASSWORD = "Sup3r-Secret-pw"
CONFIG = """
[database]
url = "{url}"

[metrics]
port = 0

[[monitor]]
name = "plant"
table = {table}
timestamp_column = "ts"
features = [{features}]
kind = "dae"
interval_seconds = 1

[monitor.model]
n_estimators = 1
epochs = 3
"""


def run_cli(config, *args):
    result = subprocess.run([sys.executable, "-m", "anomaly_monitor", "-vv", "--config",
                             str(config), *args], capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def write(tmp_path, url, table='"readings"', features=None):
    path = tmp_path / "am.toml"
    names = features or ", ".join(f'"{f}"' for f in FEATURES)
    path.write_text(CONFIG.format(url=url, table=table, features=names))
    return path


@pytest.mark.slow
def test_the_password_never_appears(pg_server, pg_url, tmp_path):
    role = f"am_{uuid.uuid4().hex[:8]}"  # cluster-wide; goes with the test server
    with pg_server.connect() as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    url = pg_url.replace("postgres@", f"{role}:{PASSWORD}@")
    engine = create_engine(url)
    bulk_insert(engine, source_table(engine), Sensors().normal(200))
    engine.dispose()
    config = write(tmp_path, url)
    outputs = [run_cli(config, *args) for args in (
        ["check"], ["train", "plant"], ["run", "--once"], ["status", "--json"],
        ["models", "list", "--json"], ["anomalies", "plant", "--json"])]
    assert [code for code, _ in outputs] == [0] * 6, outputs
    broken = [  # a missing database is the configuration's fault (2); a closed port is not
        (url.rsplit("/", 1)[0] + "/no_such_database", 2),
        (url.replace(f":{pg_server.port}/", f":{free_port()}/"), 1),
    ]
    for broken_url, expected in broken:
        config = write(tmp_path, broken_url)  # (one file: written for each in turn)
        for args in (["check"], ["status", "--json"], ["run", "--once"]):
            code, output = run_cli(config, *args)
            assert code == expected and "Traceback" not in output, output
            outputs.append((code, output))
    for _, output in outputs:
        assert PASSWORD not in output
    assert any("***" in output for _, output in outputs)


@pytest.mark.parametrize(("table", "features"), [
    ('"readings\\"; DROP TABLE am_cursors; --"', None),
    ('"readings"', '"f0", "f1; DELETE FROM am_batches"'),
    ('"read\'ings"', None),
    ('"readings"', '"f0\\\\"'),
])
def test_hostile_identifiers_are_rejected_before_any_query(db_url, tmp_path, table, features):
    engine = create_engine(db_url)
    source_table(engine)
    config = write(tmp_path, db_url, table=table, features=features)
    code, output = run_cli(config, "check")
    assert code == 2 and "Traceback" not in output
    assert "without quotes, semicolons" in output or "no quotes, semicolons" in output
    with engine.connect() as connection:
        assert {"am_cursors", "am_batches", "readings"} <= set(
            sa.inspect(connection).get_table_names())
    engine.dispose()
