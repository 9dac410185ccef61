"""Engine factory and the few places where SQLite and PostgreSQL differ."""

from __future__ import annotations

import logging
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from anomaly_monitor.identity import APPLICATION_NAME

log = logging.getLogger(__name__)

#: A connection attempt gives up after this many seconds.
CONNECT_TIMEOUT_SECONDS = 10
#: PostgreSQL statements and lock waits are cancelled after these many milliseconds,
#: so that a hung database cannot hang a batch.
STATEMENT_TIMEOUT_MS = 60_000
LOCK_TIMEOUT_MS = 10_000
#: A transaction left idle longer than this is ended by the server.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
#: SQLite waits this long for a competing writer's lock.
SQLITE_BUSY_TIMEOUT_SECONDS = 30


class DatabaseError(RuntimeError):
    """The database is unreachable or refused a statement (message has no password)."""


class DatabaseURLError(DatabaseError):
    """The configured database URL is malformed or names an unknown driver."""


#: Query parameters of a URL that carry secrets (libpq accepts ``?password=``).
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "passfile"})


def _secrets(url: URL) -> list[str]:
    """The password of ``url`` and any secret query parameters' values."""
    found = [str(url.password)] if url.password else []
    for key, value in url.query.items():
        if key.lower() in SECRET_QUERY_KEYS:
            found += [value] if isinstance(value, str) else list(value)
    return [v for v in found if v]


def redact(url: str | URL) -> str:
    """``url`` with its password (and secret query parameters) masked, for logs and messages."""
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "<unparseable database URL>"
    hidden = {key: "***" for key in parsed.query if key.lower() in SECRET_QUERY_KEYS}
    rendered = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
    return rendered.replace("%2A%2A%2A", "***")


def _normalise(url: URL) -> URL:
    # "postgresql://" means psycopg2 to SQLAlchemy; this package ships psycopg 3.
    if url.drivername in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg")
    return url


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the source's writers and the scorer's reader work at the same time. The
    # mode stays with the file: say so the first time this switches it.
    mode = cursor.execute("PRAGMA journal_mode").fetchone()
    if mode is not None and str(mode[0]).lower() not in ("wal", "memory"):
        cursor.execute("PRAGMA journal_mode=WAL")
        log.warning("switched the SQLite file to WAL journal mode (it stays so; writers and "
                    "the monitor's reads then do not block each other; PRAGMA "
                    "journal_mode=DELETE switches it back)")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000:d}")
    cursor.close()


def _server_settings() -> dict[str, int]:
    return {"statement_timeout": STATEMENT_TIMEOUT_MS, "lock_timeout": LOCK_TIMEOUT_MS,
            "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT_MS}


def postgresql_connect_args(url: URL | None = None) -> dict[str, Any]:
    """The libpq parameters every PostgreSQL connection of this package uses: its
    timeouts, except those the URL's own ``options`` (``-c statement_timeout=...``) or
    ``connect_timeout`` set, which win; and its ``application_name``, always."""
    given = url.query.get("options") if url is not None else None
    given = " ".join(given) if isinstance(given, tuple) else given
    # "-c name=value" or "--name=value", the two forms libpq's options take.
    named = set(re.findall(r"(?:-c\s*|--)([A-Za-z_.]+)\s*=", given or ""))
    options = [given] if given else []
    options += [f"-c {name}={value}" for name, value in _server_settings().items()
                if name not in named]
    args: dict[str, Any] = {
        "options": " ".join(options),
        # Names this process's sessions, so that a successor can tell when they are all
        # gone (a dead lease holder: anomaly_monitor.cursors).
        "application_name": APPLICATION_NAME,
    }
    if url is None or "connect_timeout" not in url.query:
        args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return args


def create_engine(url: str | URL, **kwargs: Any) -> sa.Engine:
    """An engine with pre-ping, connect and statement timeouts for ``url``."""
    try:
        parsed = _normalise(make_url(url))
    except (sa.exc.ArgumentError, ValueError):
        raise DatabaseURLError(f"invalid database URL {redact(url)!r}") from None
    options: dict[str, Any] = {"pool_pre_ping": True, **kwargs}
    if parsed.get_backend_name() == "sqlite":
        options.setdefault("connect_args", {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    elif parsed.get_backend_name() == "postgresql":
        options.setdefault("connect_args", postgresql_connect_args(parsed))
    try:
        engine = sa.create_engine(parsed, **options)
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise DatabaseURLError(f"cannot use database URL {redact(url)!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def describe_error(exc: BaseException, url: str | URL | None = None) -> str:
    """One line describing a database error, without the password or SQL parameters."""
    if isinstance(exc, sa.exc.DBAPIError):
        message = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    else:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if url is not None:
        for secret in _secrets(make_url(url)):
            message = message.replace(secret, "***")
    return message


def is_postgresql(engine: sa.Engine) -> bool:
    """Whether ``engine`` talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"
