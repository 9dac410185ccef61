"""Configuration: exact format, clear errors naming the key and the file, env overrides."""

from __future__ import annotations

import pytest

from anomaly_monitor.config import (
    EXAMPLE,
    ConfigError,
    load_settings,
    parse_settings,
)
from anomaly_monitor.db import describe_error, redact

VALID = """
[database]
url = "sqlite:///x.db"

[metrics]
host = "0.0.0.0"
port = 9200

[[monitor]]
name = "plant"
table = "readings"
id_column = "id"
timestamp_column = "ts"
features = ["f0", "f1"]
kind = "sae"
interval_seconds = 5
batch_size = 100
query_delay_seconds = 2.5
[monitor.threshold]
method = "pot"
target_fpr = 0.001
[monitor.model]
epochs = 7
"""


def write(tmp_path, text):
    path = tmp_path / "am.toml"
    path.write_text(text)
    return path


def test_a_full_config_parses(tmp_path):
    settings = load_settings(write(tmp_path, VALID), environ={})
    monitor = settings.monitor("plant")
    assert settings.database_url == "sqlite:///x.db" and settings.metrics_port == 9200
    assert monitor.features == ("f0", "f1") and monitor.kind == "sae"
    assert monitor.interval_seconds == 5.0 and monitor.batch_size == 100
    assert monitor.threshold.method == "pot" and monitor.threshold.target_fpr == 0.001
    assert monitor.model == {"epochs": 7}


def test_the_example_written_by_init_is_valid(tmp_path):
    settings = load_settings(write(tmp_path, EXAMPLE), environ={})
    assert [m.name for m in settings.monitors] == ["plant"]
    assert settings.monitors[0].threshold.method == "robust"


def test_the_threshold_method_defaults_to_robust():
    monitor = {"name": "a", "table": "t", "timestamp_column": "ts"}
    settings = parse_settings({"monitor": [monitor]}, environ={})
    assert settings.monitor("a").threshold.method == "robust"
    settings = parse_settings({"monitor": [{**monitor, "threshold": {"target_fpr": 0.001}}]},
                              environ={})
    assert settings.monitor("a").threshold.method == "robust"


def test_environment_overrides_the_url_and_port(tmp_path):
    env = {"ANOMALY_MONITOR_DATABASE_URL": "postgresql://u:secret@h/db",
           "ANOMALY_MONITOR_METRICS_PORT": "0"}
    settings = load_settings(write(tmp_path, VALID), environ=env)
    assert settings.database_url == "postgresql://u:secret@h/db"
    assert settings.metrics_port == 0


def test_config_path_from_the_environment(tmp_path, monkeypatch):
    path = write(tmp_path, VALID)
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, environ={"ANOMALY_MONITOR_CONFIG": str(path)}).monitors


@pytest.mark.parametrize(("change", "message"), [
    (("kind = \"sae\"", "kind = \"gan\""), r"monitor\[0\]\.kind must be one of vae, dae, sae"),
    (("batch_size = 100", "batch_size = \"100\""), r"batch_size must be an integer"),
    (("batch_size = 100", "batch_size = true"), r"batch_size must be an integer"),
    (("interval_seconds = 5", "interval_seconds = -1"), r"interval_seconds must be a positive"),
    (("batch_size = 100", "batchsize = 100"), r"unknown key monitor\[0\]\.batchsize"),
    (("host = ", "hots = "), r"unknown key metrics\.hots"),
    (("table = \"readings\"", ""), r"monitor\[0\]\.table is required"),
    (("target_fpr = 0.001", "target_fpr = 2"), r"target_fpr must be a number between 0 and 1"),
    (("epochs = 7", "kind = \"vae\""), r"unknown key monitor 'plant'\.model\.kind"),
    (("name = \"plant\"", "name = \"pl ant; drop\""), r"name must be a name of letters"),
    (("port = 9200", "port = 70000"), r"metrics\.port must be an integer port"),
    (("[database]", "[databse]"), r"unknown key top level\.databse"),
])
def test_errors_name_the_key_and_the_file(tmp_path, change, message):
    path = write(tmp_path, VALID.replace(*change))
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)


def test_missing_file_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"not found.*anomaly-monitor init"):
        load_settings(tmp_path / "none.toml", environ={})
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(write(tmp_path, "[database\n"), environ={})


def test_duplicate_monitor_names_and_fixed_without_value():
    monitor = {"name": "a", "table": "t", "timestamp_column": "ts"}
    with pytest.raises(ConfigError, match="'a' is used twice"):
        parse_settings({"monitor": [monitor, monitor]}, environ={})
    with pytest.raises(ConfigError, match="value is required"):
        parse_settings({"monitor": [{**monitor, "threshold": {"method": "fixed"}}]}, environ={})


def test_unknown_monitor_lists_the_known_ones():
    settings = parse_settings({"monitor": [{"name": "a", "table": "t", "timestamp_column": "ts"}]},
                              environ={})
    with pytest.raises(ConfigError, match=r"no monitor named 'b'.*monitors: a"):
        settings.monitor("b")


def test_passwords_are_redacted():
    url = "postgresql+psycopg://user:s3cr3t@db:5432/app"
    assert "s3cr3t" not in redact(url) and "***" in redact(url)
    assert "s3cr3t" not in describe_error(RuntimeError("login for s3cr3t failed"), url)
    # libpq also takes the password as a query parameter.
    query = "postgresql+psycopg://user@db:5432/app?password=s3cr3t&sslmode=require"
    assert redact(query) == "postgresql+psycopg://user@db:5432/app?password=***&sslmode=require"
    assert "s3cr3t" not in describe_error(RuntimeError("login for s3cr3t failed"), query)


def test_model_values_are_checked_on_demand_and_names_match_the_detector(tmp_path):
    from anomaly_monitor import AutoencoderDetector
    from anomaly_monitor.config import MODEL_PARAMETERS, check_model_params

    assert set(MODEL_PARAMETERS) == set(AutoencoderDetector().get_params()) - {
        "kind", "device", "verbose"}
    settings = load_settings(write(tmp_path, VALID.replace("epochs = 7", "epochs = 0")),
                             environ={})
    with pytest.raises(ConfigError, match=r"monitor 'plant'\.model: epochs"):
        check_model_params(settings, settings.monitor("plant"))


def test_the_old_score_key_is_read_as_score_type(tmp_path):
    old = load_settings(write(tmp_path, VALID.replace("epochs = 7", 'score = "elbo"')),
                        environ={})
    assert dict(old.monitor("plant").model) == {"score_type": "elbo"}
    both = VALID.replace("epochs = 7", 'score = "elbo"\nscore_type = "mc"')
    with pytest.raises(ConfigError, match="sets both score and score_type"):
        load_settings(write(tmp_path, both), environ={})


def test_the_activation_names_match_the_modules():
    from anomaly_monitor.detectors.layers import ACTIVATION_MODULES
    from anomaly_monitor.hyperparameters import ACTIVATIONS

    assert tuple(ACTIVATION_MODULES) == ACTIVATIONS


def test_reading_a_config_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "am.toml"
    path.write_text('[[monitor]]\nname = "m"\ntable = "t"\ntimestamp_column = "ts"\n'
                    'features = ["a"]\n'
                    '[monitor.model]\nlatent_dim = 3\n')
    code = ("import sys; from anomaly_monitor.config import load_settings; "
            f"load_settings({str(path)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("retrain", "message"), [
    ("every_seconds = 10", r"retrain\.every_seconds must be a number of seconds, at least 60"),
    ("on_drift = true\nwindow_rows = 100\nwindow_seconds = 60",
     r"set window_rows or window_seconds, not both"),
    ('on_drift = true\npromote = "sometimes"', r"retrain\.promote must be one of manual, auto"),
    ("shadow_rows = 100", r"needs every_seconds or on_drift = true"),
    ('on_drift = true\nexclude = ["flagged", "nope"]', r"retrain\.exclude must be a list"),
    ("on_drift = true\nkeep_versions = 3", r"unknown key monitor 'plant'\.retrain\.keep_ver"),
])
def test_retrain_settings_are_checked(tmp_path, retrain, message):
    path = write(tmp_path, VALID + f"\n[monitor.retrain]\n{retrain}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(path, environ={})


def test_retrain_settings_default_to_a_window_of_rows(tmp_path):
    path = write(tmp_path, VALID.replace('name = "plant"', 'name = "plant"\nkeep_versions = 3')
                 + "\n[monitor.retrain]\non_drift = true\n")
    monitor = load_settings(path, environ={}).monitors[0]
    assert monitor.keep_versions == 3 and monitor.retrain is not None
    assert monitor.retrain.window_rows == 10_000 and monitor.retrain.window_seconds is None
    assert monitor.retrain.exclude == ("labelled", "suppressed")
    assert monitor.retrain.promote == "manual" and monitor.shadow is monitor.retrain


def test_incident_settings_are_checked():
    monitor = {"name": "m", "table": "t", "timestamp_column": "ts"}
    default = parse_settings({"monitor": [monitor]}, environ={}).monitors[0].incidents
    assert default.gap_seconds is None and default.alert_severity == 50.0
    chosen = parse_settings({"monitor": [{**monitor, "incidents": {
        "gap_seconds": 600, "alert_severity": 50}}]}, environ={}).monitors[0].incidents
    assert (chosen.gap_seconds, chosen.alert_severity) == (600.0, 50.0)
    for bad, message in (({"gap_seconds": 0}, "incidents.gap_seconds must be a positive"),
                         ({"alert_severity": 101}, "from 0 to 100"),
                         ({"gap": 5}, "unknown key monitor 'm'.incidents.gap")):
        with pytest.raises(ConfigError, match=message):
            parse_settings({"monitor": [{**monitor, "incidents": bad}]}, environ={})
