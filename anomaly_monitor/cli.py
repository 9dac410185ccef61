"""The ``anomaly-monitor`` command line (Click).

Exit codes: 0 success, 1 failure, 2 bad usage or configuration. Errors are one
line on stderr, never a traceback, and never contain the database password.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import sqlalchemy as sa

from anomaly_monitor import __version__
from anomaly_monitor.config import (
    EXAMPLE,
    ConfigError,
    MonitorSettings,
    Settings,
    config_path,
    load_settings,
)
from anomaly_monitor.db import (
    DatabaseError,
    DatabaseURLError,
    create_engine,
    describe_error,
    redact,
)

if TYPE_CHECKING:
    pass

EXIT_FAILURE = 1
EXIT_USAGE = 2
#: A closed output pipe: what a shell reports for a process ended by SIGPIPE.
EXIT_BROKEN_PIPE = 141


class UtcDateTime(click.ParamType):
    """An ISO 8601 time as the tool prints it (``2026-01-05``, ``2026-01-05 03:53``,
    ``2026-01-05T03:53:00+00:00``, ``...Z``): one with an offset is converted to UTC,
    one without is taken as UTC; the value is naive UTC."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        try:
            parsed = dt.datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time (e.g. 2026-01-05, "
                      "2026-01-05T03:53:00, 2026-01-05T03:53:00+00:00)", param, ctx)
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
        return parsed


#: The type of every time option.
DATETIME = UtcDateTime()


class CliError(click.ClickException):
    """A one-line error with an exit code (1 failure, 2 usage/config)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _translate(exc: Exception, url: str | None) -> CliError | None:
    """Map a known exception to a :class:`CliError`, ``None`` for unknown ones."""
    from anomaly_monitor.lifecycle import TrainingError
    from anomaly_monitor.registry import RegistryError, UnknownVersionError
    from anomaly_monitor.source import SchemaError

    if isinstance(exc, ConfigError | SchemaError | DatabaseURLError | UnknownVersionError):
        return CliError(str(exc), EXIT_USAGE)
    if type(exc).__module__.startswith("alembic") and type(exc).__name__ == "CommandError":
        return CliError(f"migration: {exc}", EXIT_USAGE)
    if isinstance(exc, RegistryError | TrainingError | DatabaseError):
        return CliError(str(exc))
    if isinstance(exc, sa.exc.SQLAlchemyError):
        from anomaly_monitor.runner import is_configuration_error

        where = f" ({redact(url)})" if url else ""
        # A rejected login or a missing database is the configuration's to fix (exit 2).
        code = EXIT_USAGE if is_configuration_error(exc) else EXIT_FAILURE
        return CliError(f"database error{where}: {describe_error(exc, url)}", code)
    if isinstance(exc, ValueError | OSError):
        return CliError(str(exc))
    return None


class App:
    """Per-invocation state: the settings and the engine, created on first use."""

    def __init__(self, config: str | None) -> None:
        self.config = config
        self._settings: Settings | None = None
        self._engine: sa.Engine | None = None
        #: Set by ``db upgrade``: the one command that creates a missing SQLite file.
        self.creates_database = False

    @property
    def settings(self) -> Settings:
        """The validated configuration."""
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings

    @property
    def engine(self) -> sa.Engine:
        """The database engine of the configured URL."""
        if self._engine is None:
            url = self.settings.database_url
            if not self.creates_database:
                _refuse_missing_sqlite(url)
            self._engine = create_engine(url)
        return self._engine

    @property
    def url(self) -> str | None:
        """The database URL when the settings are loaded (for redacted messages)."""
        return self._settings.database_url if self._settings else None

    def monitor(self, name: str | None) -> MonitorSettings:
        """The named monitor, or the only one when ``name`` is ``None``."""
        if name is not None:
            return self.settings.monitor(name)
        if len(self.settings.monitors) != 1:
            raise CliError("several monitors are configured; name one with --monitor",
                           EXIT_USAGE)
        return self.settings.monitors[0]

    def close(self) -> None:
        """Release the engine's connections."""
        if self._engine is not None:
            self._engine.dispose()


def _refuse_missing_sqlite(url: str) -> None:
    """No command but ``db upgrade`` creates the SQLite file it was pointed at."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return  # create_engine reports it
    path = parsed.database
    if parsed.get_backend_name() == "sqlite" and path and path != ":memory:" \
            and not path.startswith("file:") and not Path(path).exists():
        raise CliError(f"database {redact(url)}: the SQLite file {Path(path).resolve()} does "
                       "not exist (set ANOMALY_MONITOR_DATABASE_URL or [database] url; "
                       "anomaly-monitor db upgrade creates it)", EXIT_USAGE)


class Group(click.Group):
    """Turns known exceptions into one-line errors with the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command, translating errors."""
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # one line, as every other error
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise CliError(f"{exc.format_message()} (see: {where} --help)",
                           exc.exit_code) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (``status | head``): stop quietly, as SIGPIPE would.
            _silence_stdout()
            raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None
        except Exception as exc:
            app = ctx.obj if isinstance(ctx.obj, App) else None
            translated = _translate(exc, app.url if app else None)
            if translated is None:
                raise CliError(f"unexpected {type(exc).__name__}: {exc}") from None
            raise translated from None
        finally:
            if isinstance(ctx.obj, App):
                ctx.obj.close()


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's final flush into
    the closed pipe does not print an error (a no-op without a real descriptor)."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # replaced by a test runner or a wrapper
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


pass_app = click.make_pass_decorator(App)


class UtcFormatter(logging.Formatter):
    """Log times in UTC, ISO 8601 with a ``Z``, like every other time this program shows."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def ratio(value: float | None) -> str:
    """A share in ``[0, 1]`` as ``0.123`` (``-`` when unknown), in tables."""
    return "-" if value is None else f"{value:.3f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


@click.group(cls=Group)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="Config file (default: $ANOMALY_MONITOR_CONFIG or ./anomaly-monitor.toml).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(__version__, prog_name="anomaly-monitor")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbose: int) -> None:
    """Watch SQL tables for anomalous rows with autoencoder detectors."""
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # APScheduler logs every job run at INFO; keep that for -vv.
    for noisy in ("apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    # SQL statements and their parameters only at -vvv.
    logging.getLogger("sqlalchemy").setLevel(logging.INFO if verbose >= 3 else logging.WARNING)
    ctx.obj = App(config)


@main.command()
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_context
def init(ctx: click.Context, force: bool) -> None:
    """Write a commented example configuration."""
    path = config_path(ctx.find_object(App).config)
    if path.exists() and not force:
        raise CliError(f"{path} already exists (use --force to overwrite)")
    path.write_text(EXAMPLE, encoding="utf-8")
    click.echo(f"wrote {path}; edit it, then run: anomaly-monitor db upgrade")


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` up front on a host without a CUDA device (exit 2)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise CliError(f"--device cuda: no CUDA device is available on this host (torch "
                       f"{torch.__version__}, built for CUDA: {torch.version.cuda or 'no'}); "
                       "use --device cpu or auto", EXIT_USAGE)


#: Which threshold options each calibration method takes.
METHOD_OPTIONS = {"labels": (), "fixed": ("--value",)}
RATE_OPTIONS = ("--target-fpr", "--alerts-per-day")


def check_threshold_options(method: str, given: dict[str, bool]) -> None:
    """Exit 2 naming the conflict when ``calibrate``'s options contradict each other or
    the method (``given``: option name -> whether it was given)."""
    rates = [name for name in RATE_OPTIONS if given.get(name)]
    if len(rates) > 1:
        raise CliError(f"{' and '.join(rates)} conflict: they are two ways to set one rate; "
                       "give one", EXIT_USAGE)
    allowed = METHOD_OPTIONS.get(method, RATE_OPTIONS)
    unused = [name for name, on in given.items() if on and name not in allowed]
    if unused:
        takes = ", ".join(allowed) if allowed else "none of them"
        raise CliError(f"{', '.join(unused)} does not apply to --method {method} (it takes "
                       f"{takes})", EXIT_USAGE)


def require_schema(app: App) -> None:
    """Refuse to go on unless the am_ tables are at this release's revision."""
    from anomaly_monitor import migrate

    current, head = migrate.current_revision(app.engine), migrate.head_revision()
    if current != head:
        raise CliError(
            f"database {redact(app.settings.database_url)}: the am_ tables are at revision "
            f"{current or 'base'}, not {head}; run: anomaly-monitor db upgrade", EXIT_USAGE)


@main.command()
@click.option("--directory", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default=True, help="Where the demo writes its database and config.")
@click.option("--seconds", type=click.IntRange(min=5), default=60, show_default=True,
              help="How long the daemon runs while rows arrive.")
@click.option("--port", type=click.IntRange(0, 65535), default=9108, show_default=True,
              help="Metrics port (0: off).")
def demo(directory: Path, seconds: int, port: int) -> None:
    """Simulate plant telemetry on SQLite, train, calibrate and run the daemon."""
    from anomaly_monitor.demo import run_demo

    run_demo(directory, seconds=seconds, metrics_port=port, echo=click.echo)


# The other commands live by concept in these modules and register themselves on ``main``.
from anomaly_monitor import (  # noqa: E402, F401
    cli_backtest,
    cli_daemon,
    cli_db,
    cli_feedback,
    cli_lifecycle,
    cli_models,
    cli_suppress,
)
