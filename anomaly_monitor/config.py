"""Settings from a TOML file, with ``ANOMALY_MONITOR_*`` environment overrides.

The file is found at ``--config PATH``, else ``$ANOMALY_MONITOR_CONFIG``, else
``./anomaly-monitor.toml``. Every key is checked: an unknown key, a wrong type or
a missing field raises :class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly_monitor.calibration import DEFAULT_METHOD, METHODS
from anomaly_monitor.hyperparameters import KINDS, MODEL_PARAMETERS, RENAMED_MODEL_PARAMETERS

DEFAULT_PATH = Path("anomaly-monitor.toml")
ENV_CONFIG = "ANOMALY_MONITOR_CONFIG"
ENV_DATABASE_URL = "ANOMALY_MONITOR_DATABASE_URL"
ENV_METRICS_HOST = "ANOMALY_MONITOR_METRICS_HOST"
ENV_METRICS_PORT = "ANOMALY_MONITOR_METRICS_PORT"
DEFAULT_DATABASE_URL = "sqlite:///anomaly_monitor.db"
#: Monitor names appear in metric labels, file names and SQL values: keep them plain.
MONITOR_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
#: Threshold methods (``anomaly_monitor.calibration`` documents their assumptions).
THRESHOLD_METHODS = METHODS
#: torch threads per scoring operation in the daemon (``run --threads``). A batch is
#: small (one thread scores about two million rows a second); more threads per
#: operation only contend with the reader of the next window and other monitors' jobs.
SCORING_THREADS = 1


class ConfigError(ValueError):
    """The configuration is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ThresholdSettings:
    """How ``calibrate`` (and ``train``) set a monitor's threshold."""

    method: str = DEFAULT_METHOD
    target_fpr: float = 0.01
    alerts_per_day: float | None = None
    value: float | None = None


#: Derived inputs a window monitor may add (``[monitor.window] derived``): ``diff``, the
#: change of each feature from the sample before (for every lag of the window);
#: ``spread``, the log of each feature's spread over the window against its baseline's
#: (a stuck sensor has none).
WINDOW_DERIVED = ("diff", "spread")
#: The most samples a window may hold.
MAX_WINDOW_SIZE = 512


@dataclass(frozen=True)
class WindowSettings:
    """``[monitor.window]``: score each row with the samples of its entity before it.

    ``size`` samples before the row (oldest first) join its own features;
    ``baseline_half_life`` (samples) is how fast each entity's scaling follows its
    data: after a level shift, the mean has moved half-way there after that many of
    the entity's samples.
    """

    size: int = 32
    derived: tuple[str, ...] = ()
    baseline_half_life: float = 1000.0


#: Incidents of at least this severity (0-100; 50 is a tail probability of 1e-3, ten
#: times rarer than the rows a 1% threshold flags; window monitors' incidents rarely
#: reach 90) raise an alert (``anomaly_monitor_incident_severity``).
DEFAULT_ALERT_SEVERITY = 50.0


@dataclass(frozen=True)
class IncidentSettings:
    """``[monitor.incidents]``: how flags group into incidents, and which alert.

    ``gap_seconds`` is the most source time between two flags of one incident (by
    default three sampling intervals, ``anomaly_monitor.incidents``); incidents of at
    least ``alert_severity`` are exported for the ``AnomalyMonitorIncident`` alert.
    """

    gap_seconds: float | None = None
    alert_severity: float = DEFAULT_ALERT_SEVERITY


@dataclass(frozen=True)
class RecurringWindow:
    """``[[monitor.suppress]]``: a window that recurs (nightly maintenance): it opens at
    each time the cron expression gives in ``timezone`` and lasts ``duration_seconds``.
    Flags of rows stamped inside it (of ``entity`` only, when set) are stored, marked
    suppressed, and kept out of incidents and alerts; with ``skip_training`` the rows
    are also left out of training (``anomaly_monitor.suppression``)."""

    name: str
    cron: str
    duration_seconds: float
    timezone: str = "UTC"
    entity: str | None = None
    reason: str = ""
    skip_training: bool = False


#: What a scheduled retrain may leave out of its window (``exclude``).
RETRAIN_EXCLUDE = ("flagged", "labelled", "suppressed")
#: What a scheduled retrain leaves out by default: not every flag, for after a lasting
#: shift the old version flags the new normal rows, which the retrain must learn.
DEFAULT_RETRAIN_EXCLUDE = ("labelled", "suppressed")
#: The newest rows a scheduled retrain trains on, unless a window is configured.
DEFAULT_RETRAIN_ROWS = 10_000
PROMOTE_MODES = ("manual", "auto")


@dataclass(frozen=True)
class RetrainSettings:
    """``[monitor.retrain]``: the daemon trains a challenger every ``every_seconds``
    (``None``: not on a schedule) and, with ``on_drift``, when the batches drift past
    the documented level (``anomaly_monitor.drift``), on the newest ``window_rows`` rows
    or those of the last ``window_seconds``, leaving ``exclude`` out. The challenger
    scores in shadow for ``shadow_rows`` rows; then its promotion gates decide
    (``promote = "auto"``) or an operator does (``manual``; ``anomaly_monitor.shadow``)."""

    every_seconds: float | None = None
    window_rows: int | None = None
    window_seconds: float | None = None
    exclude: tuple[str, ...] = DEFAULT_RETRAIN_EXCLUDE
    on_drift: bool = False
    shadow_rows: int = 1000
    promote: str = "manual"


#: Versions whose artifacts are kept unless ``keep_versions`` says otherwise.
DEFAULT_KEEP_VERSIONS = 10


@dataclass(frozen=True)
class MonitorSettings:
    """One watched table."""

    name: str
    table: str
    timestamp_column: str
    id_column: str = "id"
    schema: str | None = None
    features: tuple[str, ...] | None = None
    label_column: str | None = None
    #: Windows and baselines are kept per value of this column (host, device).
    entity_column: str | None = None
    #: Set for a window monitor (a metric stream); ``None`` scores rows on their own.
    window: WindowSettings | None = None
    kind: str = "vae"
    interval_seconds: float = 30.0
    batch_size: int = 10_000
    query_delay_seconds: float = 0.0
    #: How a timestamp column of epoch numbers is read: ``s``, ``ms``, ``us``, ``ns``,
    #: or ``auto`` (each value by its size: below 1e11 seconds, then ms, us, ns).
    timestamp_unit: str = "auto"
    lease_seconds: float | None = None
    threshold: ThresholdSettings = field(default_factory=ThresholdSettings)
    incidents: IncidentSettings = field(default_factory=IncidentSettings)
    model: Mapping[str, Any] = field(default_factory=dict)
    suppress: tuple[RecurringWindow, ...] = ()
    #: Scheduled and drift-triggered retraining; ``None``: only ``train`` trains (a
    #: version stored with ``--no-activate`` still scores in shadow, gates shown).
    retrain: RetrainSettings | None = None
    #: The newest versions whose artifacts are kept (the active one, the one a rollback
    #: returns to and a shadow challenger always are).
    keep_versions: int = DEFAULT_KEEP_VERSIONS

    @property
    def shadow(self) -> RetrainSettings:
        """How a challenger is judged: ``retrain`` or its defaults."""
        return self.retrain or RetrainSettings()


#: Unless configured, a worker's lease on a monitor lasts this many intervals (at least
#: MIN_LEASE_SECONDS): a standby takes over that long after the leader dies.
LEASE_INTERVALS = 3
MIN_LEASE_SECONDS = 30.0


def lease_duration(monitor: MonitorSettings) -> float:
    """Seconds a worker's lease on ``monitor`` lasts between renewals."""
    if monitor.lease_seconds is not None:
        return monitor.lease_seconds
    return max(MIN_LEASE_SECONDS, LEASE_INTERVALS * monitor.interval_seconds)


@dataclass(frozen=True)
class Settings:
    """The whole configuration."""

    path: Path | None
    database_url: str = DEFAULT_DATABASE_URL
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108
    monitors: tuple[MonitorSettings, ...] = ()

    def monitor(self, name: str) -> MonitorSettings:
        """The monitor called ``name``; :class:`ConfigError` when there is none."""
        for monitor in self.monitors:
            if monitor.name == name:
                return monitor
        known = ", ".join(m.name for m in self.monitors) or "none configured"
        raise ConfigError(f"no monitor named {name!r} in {self.path} (monitors: {known})")


# -- field checks ------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _rate(v: Any) -> bool:
    return _is_number(v) and 0 < v < 1


def _text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


#: Characters never allowed in a table, schema or column name from the config: they
#: have no business in an identifier and are how SQL injection starts.
FORBIDDEN_IDENTIFIER = re.compile(r"[\"'`;\\\x00-\x1f\x7f]")
MAX_IDENTIFIER_LENGTH = 128


def _identifier(v: Any) -> bool:
    return (isinstance(v, str) and 0 < len(v) <= MAX_IDENTIFIER_LENGTH
            and not FORBIDDEN_IDENTIFIER.search(v))


def _names(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_identifier(x) for x in v)


def _port(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= 65535


#: Epoch timestamps: units per second; ``auto`` reads each number by its size.
TIMESTAMP_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}
TIMESTAMP_UNIT_CHOICES: tuple[str, ...] = ("auto", *TIMESTAMP_UNITS)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in choices


Check = tuple[Callable[[Any], bool], str]
_TEXT: Check = (_text, "a non-empty string")
_IDENTIFIER: Check = (_identifier, "a table or column name without quotes, semicolons, "
                                   "backslashes or control characters")
_DATABASE: dict[str, Check] = {"url": _TEXT}
_METRICS: dict[str, Check] = {"host": _TEXT, "port": (_port, "an integer port 0-65535")}
_THRESHOLD: dict[str, Check] = {
    "method": (_one_of(THRESHOLD_METHODS), f"one of {', '.join(THRESHOLD_METHODS)}"),
    "target_fpr": (_rate, "a number between 0 and 1 (exclusive)"),
    "alerts_per_day": (_positive, "a positive number"),
    "value": (_is_number, "a finite number"),
}
_MONITOR: dict[str, Check] = {
    "name": (lambda v: isinstance(v, str) and bool(MONITOR_NAME.match(v)),
             "a name of letters, digits, '_', '.', '-' starting with a letter (max 64)"),
    "table": _IDENTIFIER,
    "schema": _IDENTIFIER,
    "id_column": _IDENTIFIER,
    "timestamp_column": _IDENTIFIER,
    "features": (_names, "a non-empty list of column names (no quotes, semicolons, "
                         "backslashes or control characters)"),
    "label_column": _IDENTIFIER,
    "entity_column": _IDENTIFIER,
    "window": (lambda v: isinstance(v, dict), "a table"),
    "kind": (_one_of(KINDS), f"one of {', '.join(KINDS)}"),
    "interval_seconds": (_positive, "a positive number of seconds"),
    "batch_size": (lambda v: _is_int(v) and 1 <= v <= 1_000_000, "an integer 1-1000000"),
    "query_delay_seconds": (_non_negative, "a non-negative number of seconds"),
    "timestamp_unit": (_one_of(TIMESTAMP_UNIT_CHOICES),
                       f"one of {', '.join(TIMESTAMP_UNIT_CHOICES)}"),
    "lease_seconds": (_positive, "a positive number of seconds"),
    "threshold": (lambda v: isinstance(v, dict), "a table"),
    "incidents": (lambda v: isinstance(v, dict), "a table"),
    "model": (lambda v: isinstance(v, dict), "a table of detector hyperparameters"),
    "suppress": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
                 "an array of tables ([[monitor.suppress]])"),
    "retrain": (lambda v: isinstance(v, dict), "a table"),
    "keep_versions": (lambda v: _is_int(v) and 1 <= v <= 10_000, "an integer 1-10000"),
}
_RETRAIN: dict[str, Check] = {
    "every_seconds": ((lambda v: _is_number(v) and v >= 60), "a number of seconds, at least 60"),
    "window_rows": (lambda v: _is_int(v) and 50 <= v <= 10_000_000,
                    "an integer 50-10000000 (the newest rows trained on)"),
    "window_seconds": (_positive, "a positive number of seconds"),
    "exclude": (lambda v: isinstance(v, list) and all(x in RETRAIN_EXCLUDE for x in v)
                and len(set(v)) == len(v),
                f"a list of distinct values among {', '.join(RETRAIN_EXCLUDE)}"),
    "on_drift": (lambda v: isinstance(v, bool), "true or false"),
    "shadow_rows": (lambda v: _is_int(v) and 1 <= v <= 100_000_000,
                    "an integer number of rows, at least 1"),
    "promote": (_one_of(PROMOTE_MODES), f"one of {', '.join(PROMOTE_MODES)}"),
}
_WINDOW: dict[str, Check] = {
    "size": (lambda v: _is_int(v) and 1 <= v <= MAX_WINDOW_SIZE,
             f"an integer 1-{MAX_WINDOW_SIZE} (samples before each row)"),
    "derived": (lambda v: isinstance(v, list) and all(x in WINDOW_DERIVED for x in v)
                and len(set(v)) == len(v),
                f"a list of distinct derived inputs among {', '.join(WINDOW_DERIVED)}"),
    "baseline_half_life": ((lambda v: _is_number(v) and v >= 1),
                           "a number of samples, at least 1"),
}
_INCIDENTS: dict[str, Check] = {
    "gap_seconds": (_positive, "a positive number of seconds"),
    "alert_severity": ((lambda v: _is_number(v) and 0 <= v <= 100),
                       "a severity from 0 to 100"),
}
_SUPPRESS: dict[str, Check] = {
    "name": (lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v)
             is not None, "a name of 1-64 letters, digits, _ . -"),
    "cron": (lambda v: isinstance(v, str) and len(v.split()) == 5,
             "a cron expression of five fields (minute hour day month weekday)"),
    "duration_seconds": (_positive, "a positive number of seconds"),
    "timezone": (lambda v: isinstance(v, str) and bool(v), "an IANA time zone name"),
    "entity": (lambda v: isinstance(v, str) and bool(v), "an entity (a string)"),
    "reason": (lambda v: isinstance(v, str), "a string"),
    "skip_training": (lambda v: isinstance(v, bool), "true or false"),
}
_REQUIRED_MONITOR = ("name", "table", "timestamp_column")


def _check_table(
    data: Any, spec: dict[str, Check], where: str, path: Path | None
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    for key, value in data.items():
        if key not in spec:
            known = ", ".join(sorted(spec))
            raise ConfigError(f"{path}: unknown key {where}.{key} (known keys: {known})")
        check, expected = spec[key]
        if not check(value):
            raise ConfigError(f"{path}: {where}.{key} must be {expected}, got {value!r}")
    return data


# -- parsing -----------------------------------------------------------------------------

def _threshold(data: dict[str, Any], where: str, path: Path | None) -> ThresholdSettings:
    data = _check_table(data, _THRESHOLD, where, path)
    if "target_fpr" in data and "alerts_per_day" in data:
        raise ConfigError(f"{path}: {where} sets both target_fpr and alerts_per_day; they are "
                          "two ways to set one rate: keep one")
    settings = ThresholdSettings(**data)
    if settings.method == "fixed" and settings.value is None:
        raise ConfigError(f"{path}: {where}.value is required when method = \"fixed\"")
    return settings


def _model_params(data: dict[str, Any], where: str, path: Path | None) -> dict[str, Any]:
    for old, new in RENAMED_MODEL_PARAMETERS.items():
        if old in data and new in data:
            raise ConfigError(f"{path}: {where} sets both {old} and {new}; {old} is the old "
                              f"name of {new}: keep only {new}")
    data = {RENAMED_MODEL_PARAMETERS.get(key, key): value for key, value in data.items()}
    for key in data:
        if key not in MODEL_PARAMETERS:
            raise ConfigError(
                f"{path}: unknown key {where}.{key} (detector hyperparameters: "
                f"{', '.join(sorted(MODEL_PARAMETERS))})"
            )
    return dict(data)


def check_model_params(settings: Settings, monitor: MonitorSettings) -> None:
    """Validate the values of the monitor's ``[monitor.model]`` table (imports torch)."""
    from anomaly_monitor.detectors.estimator import AutoencoderDetector

    try:
        AutoencoderDetector(monitor.kind, **monitor.model).validate_params()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{settings.path}: monitor {monitor.name!r}.model: {exc}") from None


def _recurring(data: Any, index: int, monitor: dict[str, Any], where: str,
               path: Path | None) -> RecurringWindow:
    """One ``[[monitor.suppress]]`` table, its cron expression and time zone checked."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from apscheduler.triggers.cron import CronTrigger

    where = f"{where}[{index}]"
    data = _check_table(data, _SUPPRESS, where, path)
    for key in ("cron", "duration_seconds"):
        if key not in data:
            raise ConfigError(f"{path}: {where}.{key} is required")
    try:
        zone = ZoneInfo(data.get("timezone", "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{path}: {where}.timezone {data['timezone']!r} is not a known "
                          "IANA time zone (e.g. UTC, Europe/Berlin)") from None
    try:
        CronTrigger.from_crontab(data["cron"], timezone=zone)
    except ValueError as exc:
        raise ConfigError(f"{path}: {where}.cron {data['cron']!r}: {exc}") from None
    if "entity" in data and "entity_column" not in monitor:
        raise ConfigError(f"{path}: {where}.entity needs the monitor's entity_column")
    return RecurringWindow(name=data.get("name", f"suppress-{index + 1}"), cron=data["cron"],
                           duration_seconds=float(data["duration_seconds"]),
                           timezone=data.get("timezone", "UTC"), entity=data.get("entity"),
                           reason=data.get("reason", ""),
                           skip_training=data.get("skip_training", False))


def _retrain(data: Any, where: str, path: Path | None) -> RetrainSettings:
    """The ``[monitor.retrain]`` table: a trigger, and one training window at most."""
    data = dict(_check_table(data, _RETRAIN, where, path))
    if "window_rows" in data and "window_seconds" in data:
        raise ConfigError(f"{path}: {where}: set window_rows or window_seconds, not both")
    if "every_seconds" not in data and not data.get("on_drift"):
        raise ConfigError(f"{path}: {where} needs every_seconds or on_drift = true (or "
                          "both): nothing would trigger a retrain")
    if "window_seconds" not in data:
        data.setdefault("window_rows", DEFAULT_RETRAIN_ROWS)
    for key in ("every_seconds", "window_seconds"):
        if key in data:
            data[key] = float(data[key])
    if "exclude" in data:
        data["exclude"] = tuple(data["exclude"])
    return RetrainSettings(**data)


def _monitor(data: Any, index: int, path: Path | None) -> MonitorSettings:
    where = f"monitor[{index}]"
    data = dict(_check_table(data, _MONITOR, where, path))
    for key in _REQUIRED_MONITOR:
        if key not in data:
            raise ConfigError(f"{path}: {where}.{key} is required")
    where = f"monitor {data['name']!r}"
    if "features" in data:
        data["features"] = tuple(data["features"])
        if len(set(data["features"])) != len(data["features"]):
            raise ConfigError(f"{path}: {where}: features lists a column twice")
    data["threshold"] = _threshold(data.get("threshold", {}), f"{where}.threshold", path)
    if "window" in data:
        window = _check_table(data["window"], _WINDOW, f"{where}.window", path)
        data["window"] = WindowSettings(
            size=window.get("size", WindowSettings.size),
            derived=tuple(window.get("derived", ())),
            baseline_half_life=float(window.get("baseline_half_life",
                                                WindowSettings.baseline_half_life)))
    if "incidents" in data:
        incidents = _check_table(data["incidents"], _INCIDENTS, f"{where}.incidents", path)
        data["incidents"] = IncidentSettings(
            **{key: float(value) for key, value in incidents.items()})
    if "entity_column" in data and "window" not in data:
        raise ConfigError(f"{path}: {where}.entity_column needs a [monitor.window] table "
                          "(baselines per entity are kept by window monitors)")
    if "model" in data:
        data["model"] = _model_params(data["model"], f"{where}.model", path)
    if "suppress" in data:
        data["suppress"] = tuple(_recurring(item, i, data, f"{where}.suppress", path)
                                 for i, item in enumerate(data["suppress"]))
        names = [w.name for w in data["suppress"]]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: {where}.suppress names a window twice")
    if "retrain" in data:
        data["retrain"] = _retrain(data["retrain"], f"{where}.retrain", path)
    for key in ("interval_seconds", "query_delay_seconds", "lease_seconds"):
        if key in data:
            data[key] = float(data[key])
    settings = MonitorSettings(**data)
    if settings.threshold.method == "labels" and settings.label_column is None:
        raise ConfigError(f"{path}: {where}.threshold.method = \"labels\" needs label_column "
                          "(the 0/1 column the threshold is fitted to)")
    if settings.lease_seconds is not None and \
            settings.lease_seconds < 2 * settings.interval_seconds:
        raise ConfigError(f"{path}: {where}.lease_seconds must be at least twice "
                          f"interval_seconds ({2 * settings.interval_seconds:g}), or the lease "
                          "lapses between polls")
    return settings


def parse_settings(
    data: dict[str, Any], path: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate parsed TOML ``data`` and apply environment overrides."""
    environ = os.environ if environ is None else environ
    _check_table(data, {"database": (lambda v: True, ""), "metrics": (lambda v: True, ""),
                        "monitor": (lambda v: True, "")}, "top level", path)
    database = _check_table(data.get("database", {}), _DATABASE, "database", path)
    metrics = _check_table(data.get("metrics", {}), _METRICS, "metrics", path)
    raw_monitors = data.get("monitor", [])
    if not isinstance(raw_monitors, list):
        raise ConfigError(f"{path}: monitor must be an array of tables ([[monitor]])")
    monitors = tuple(_monitor(m, i, path) for i, m in enumerate(raw_monitors))
    names = [m.name for m in monitors]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: monitor name {duplicates[0]!r} is used twice")
    port = metrics.get("port", 9108)
    if ENV_METRICS_PORT in environ:
        value = environ[ENV_METRICS_PORT]
        if not value.isdigit() or not _port(int(value)):
            raise ConfigError(f"${ENV_METRICS_PORT} must be a port 0-65535, got {value!r}")
        port = int(value)
    return Settings(
        path=path,
        database_url=environ.get(ENV_DATABASE_URL) or database.get("url", DEFAULT_DATABASE_URL),
        metrics_host=environ.get(ENV_METRICS_HOST) or metrics.get("host", "127.0.0.1"),
        metrics_port=port,
        monitors=monitors,
    )


def config_path(explicit: str | Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """Where the configuration is read from (``--config``, ``$ANOMALY_MONITOR_CONFIG``, cwd)."""
    environ = os.environ if environ is None else environ
    if explicit is not None:
        return Path(explicit)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    return DEFAULT_PATH


def load_settings(
    explicit: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read, validate and return the settings; :class:`ConfigError` names what is wrong."""
    path = config_path(explicit, environ)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found (pass --config, set ${ENV_CONFIG}, "
            "or write one with 'anomaly-monitor init')"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_settings(data, path, environ)


EXAMPLE = '''\
# anomaly-monitor configuration. Every key is documented; delete what you do not need.

[database]
# Any SQLAlchemy URL. PostgreSQL: "postgresql+psycopg://user@host:5432/dbname".
# $ANOMALY_MONITOR_DATABASE_URL overrides this (keep passwords out of files).
url = "sqlite:///anomaly_monitor.db"

[metrics]
# The Prometheus exporter of 'anomaly-monitor run'. Port 0 turns it off.
host = "127.0.0.1"
port = 9108

[[monitor]]
name = "plant"                  # letters, digits, _ . - ; used in metric labels
table = "readings"              # the watched table (optionally: schema = "public")
id_column = "id"                # increasing integer key
timestamp_column = "ts"         # when the row was produced (its event time)
# timestamp_unit = "auto"       # epoch-number timestamps: auto (by size) | s | ms | us | ns
# features = ["f0", "f1"]       # default: every numeric column but id, timestamp, label
# label_column = "is_anomaly"   # optional 0/1 column: method "labels", dry-run precision/recall
kind = "vae"                    # vae | dae | sae
interval_seconds = 30           # how often the daemon looks for new rows
batch_size = 10000              # rows per transaction
query_delay_seconds = 0         # only score rows older than this (late writers)
# lease_seconds = 90            # a standby worker takes over this long after the leader
                                # dies (default: 3 intervals, at least 30 s)
# keep_versions = 10            # versions whose model artifacts are kept (the active one,
                                # the rollback target and a challenger always are)

[monitor.threshold]
method = "robust"               # robust | quantile | pot | labels | fixed; robust fits the
                                # bulk of the held-out scores, so anomalies in the history
                                # do not move the threshold
target_fpr = 0.01               # share of normal rows flagged (robust, quantile, pot)
# alerts_per_day = 20           # instead of target_fpr: from the observed row rate
# value = 3.5                   # for method = "fixed"

# A metric stream (one row per sample): score each row with the samples before it,
# with a baseline (scaling, calibration) per entity.
# entity_column = "host"        # windows and baselines per value of this column
# [monitor.window]
# size = 32                     # samples before each row that join its features
# derived = ["diff"]            # also each sample's change from the one before
# baseline_half_life = 1000     # samples: how fast an entity's baseline follows a shift

# [monitor.incidents]           # flags that follow each other form one incident
# gap_seconds = 900             # the most source time between two of its flags
#                               # (default: 3 sampling intervals of the training rows)
# alert_severity = 50           # incidents this severe (0-100) raise an alert

# [[monitor.suppress]]          # a recurring window: its flags raise no incident/alert
# name = "nightly"
# cron = "30 1 * * *"           # minute hour day month weekday, in timezone
# duration_seconds = 1800
# timezone = "UTC"
# skip_training = false         # true: also keep its rows out of training

# [monitor.retrain]             # the daemon trains a challenger; it scores in shadow
# every_seconds = 86400         # on a schedule (at least 60), and/or
# on_drift = true               # when the batches drift from the training data
# window_rows = 10000           # trained on the newest rows (or: window_seconds = 604800)
# exclude = ["labelled", "suppressed"]  # left out of its training (also: "flagged")
# shadow_rows = 1000            # rows it scores in shadow before its gates are judged
# promote = "manual"            # manual: models promote V; auto: when its gates pass

# [monitor.model]               # detector hyperparameters (defaults work across datasets)
# epochs = 100
# n_estimators = 3
'''
