"""Engine factory and the few places where SQLite and PostgreSQL differ."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

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


#: ``scheme://userinfo@rest``: the userinfo ends at the LAST ``@`` (a password may hold
#: ``@``, ``/`` or ``:`` that a URL parser would split it at).
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>.*)@(?P<rest>[^@]*)$")
#: Pieces of a password at least this long are masked too (a parser may show a piece).
MIN_SECRET_PIECE = 3


def _text(url: str | URL) -> str:
    return url if isinstance(url, str) else url.render_as_string(hide_password=False)


def _split(url: str) -> tuple[str, str, str | None, str] | None:
    """(scheme://, user, password or None, the rest) of ``url``; ``None`` without userinfo.
    The userinfo ends at the last ``@`` of the whole URL, query included: an unescaped
    ``?`` or ``#`` in a password must not end it early (an ``@`` in a query parameter
    masks too much, never too little)."""
    found = _USERINFO.match(url)
    if found is None:
        return None
    user, colon, password = found["userinfo"].partition(":")
    return found["scheme"], user, password if colon else None, found["rest"]


def _secrets(url: str | URL) -> list[str]:
    """The password of ``url`` (as written, decoded, and its pieces between ``@ / :``)
    and any secret query parameters' values."""
    text = _text(url)
    found: list[str] = []
    parts = _split(text)
    if parts is not None and parts[2]:
        password = parts[2]
        found += [password, unquote(password)]
        # What a parser that split it shows: the pieces, and the ends before or after
        # each delimiter (a host name "ss/w:rd@127.0.0.1" out of "p@ss/w:rd@127...").
        cuts = [m.start() for m in re.finditer(r"[@/:?#]", password)]
        found += [password[:c] for c in cuts] + [password[c + 1:] for c in cuts]
        found += re.split(r"[@/:?#]", password)
        found = [f for f in found if len(f) >= MIN_SECRET_PIECE or f == password]
        # A short end still shows glued to the host: "t@db" out of "s3cr@t@db".
        found += [password[c + 1:] + "@" for c in cuts if password[c + 1:]]
    try:
        for key, value in make_url(text).query.items():
            if key.lower() in SECRET_QUERY_KEYS:
                found += [value] if isinstance(value, str) else list(value)
    except (sa.exc.ArgumentError, ValueError):
        pass
    return sorted({v for v in found if v}, key=len, reverse=True)


def redact(url: str | URL) -> str:
    """``url`` with its password (and secret query parameters) masked, for logs and
    messages; however malformed, no piece of the password is shown."""
    text = _text(url)
    parts = _split(text)
    masked = text if parts is None or parts[2] is None else \
        f"{parts[0]}{parts[1]}:***@{parts[3]}"
    try:
        parsed = make_url(masked)
    except (sa.exc.ArgumentError, ValueError):
        if parts is None and ":" in text.split("://", 1)[-1].split("@")[0]:
            return "<an unparseable URL>"  # could not tell its password apart
        return masked
    hidden = {key: "***" for key in parsed.query if key.lower() in SECRET_QUERY_KEYS}
    rendered = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
    rendered = rendered.replace("%2A%2A%2A", "***")
    for secret in _secrets(text):
        rendered = rendered.replace(secret, "***@" if secret.endswith("@") else "***")
    return rendered


def _normalise(url: URL) -> URL:
    if url.host and "@" in url.host:  # user:pa@ss@host: the '@' in the password
        raise ValueError("an unescaped '@'")
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
        raise DatabaseURLError(
            f"invalid database URL {redact(url)!r}: expected "
            "dialect[+driver]://user:password@host[:port]/database or sqlite:///path; an "
            "'@', ':' or '/' inside the user or password must be percent-encoded (%40, %3A, "
            "%2F)") from None
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
        for secret in _secrets(url):
            message = message.replace(secret, "***@" if secret.endswith("@") else "***")
    return message


def is_postgresql(engine: sa.Engine) -> bool:
    """Whether ``engine`` talks to PostgreSQL."""
    return engine.dialect.name == "postgresql"
