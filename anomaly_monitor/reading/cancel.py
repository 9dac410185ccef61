"""Queries that run too long: a statement timeout seen in an error, and the cancelling
of a stopping worker's queries.

PostgreSQL ends a query that runs past ``statement_timeout`` (or is cancelled) with
SQLSTATE 57014; :func:`is_query_canceled` finds it in psycopg's exception, and in
ADBC's by libpq's message. :class:`QueryCanceller` tracks the connections an
engine has lent out, so that a worker told to stop can cancel the reads it would
otherwise wait for (PostgreSQL: a cancel request; SQLite: ``interrupt``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

log = logging.getLogger(__name__)

#: PostgreSQL's SQLSTATE for a statement ended by its timeout or a cancel request.
QUERY_CANCELED = "57014"
#: How libpq words it when ADBC gives no SQLSTATE (a server with other
#: ``lc_messages`` is not recognised there: the plain path then reads the window).
CANCELED_MESSAGE = "canceling statement due to"
#: A cancel request to PostgreSQL gives up after this long (seconds).
CANCEL_TIMEOUT_SECONDS = 2.0


def is_query_canceled(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a statement ended by ``statement_timeout``
    or a cancel request."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for candidate in (current, getattr(current, "orig", None)):
            if getattr(candidate, "sqlstate", None) == QUERY_CANCELED:
                return True
        if isinstance(current, OSError) and CANCELED_MESSAGE in str(current):  # ADBC
            return True
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__)
    return False


T = TypeVar("T")


def bounded(connection: sa.Connection, timeout_ms: int, run: Callable[[], T]) -> T | None:
    """``run()`` on ``connection``, given up (``None``) on PostgreSQL after
    ``timeout_ms`` milliseconds; the connection's own timeout is restored after it.
    Elsewhere ``run()`` as it is."""
    if connection.dialect.name != "postgresql":
        return run()
    setting = sa.func.set_config("statement_timeout", str(timeout_ms), True)
    try:
        with connection.begin_nested():  # a failure rolls the setting back with it
            before = connection.execute(sa.select(sa.func.current_setting(
                "statement_timeout"))).scalar()
            connection.execute(sa.select(setting))
            value = run()
            connection.execute(sa.select(sa.func.set_config("statement_timeout", before, True)))
            return value
    except sa.exc.OperationalError as exc:
        if is_query_canceled(exc):
            return None
        raise


#: A cancelled query that ran for less than this share of ``statement_timeout`` was
#: cancelled by someone (``pg_cancel_backend``), not ended by the timeout: SQLSTATE
#: 57014 is the same for both, and the server words it in its own language.
TIMEOUT_SHARE = 0.8


def statement_timeout_seconds(connection: sa.Connection) -> float | None:
    """The session's ``statement_timeout`` in seconds; ``None`` when there is none (0)
    or the database is not PostgreSQL."""
    if connection.dialect.name != "postgresql":
        return None
    value = connection.execute(sa.text(
        "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'")).scalar()
    milliseconds = int(value or 0)
    return milliseconds / 1000 if milliseconds > 0 else None


def ran_into_timeout(elapsed_seconds: float, timeout_seconds: float | None) -> bool:
    """Whether a query cancelled after ``elapsed_seconds`` was ended by the timeout."""
    return timeout_seconds is not None and elapsed_seconds >= TIMEOUT_SHARE * timeout_seconds


def _cancel(connection: Any) -> None:
    cancel_safe = getattr(connection, "cancel_safe", None)  # psycopg 3
    if cancel_safe is not None:
        cancel_safe(timeout=CANCEL_TIMEOUT_SECONDS)
        return
    interrupt = getattr(connection, "interrupt", None)  # sqlite3
    if interrupt is not None:
        interrupt()


class QueryCanceller:
    """The DB-API connections ``engine`` has checked out of its pool right now;
    :meth:`cancel` cancels whatever each of them runs (from another thread)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._out: dict[int, Any] = {}
        sa.event.listen(engine, "checkout", self._checkout)
        sa.event.listen(engine, "checkin", self._checkin)

    def _checkout(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        with self._lock:  # keyed by the pool's record: an invalidated one checks in None
            self._out[id(record)] = dbapi_connection

    def _checkin(self, _dbapi_connection: Any, record: Any) -> None:
        with self._lock:
            self._out.pop(id(record), None)

    def cancel(self) -> int:
        """Cancel the statements running on the checked-out connections; how many
        connections were asked."""
        with self._lock:
            connections = list(self._out.values())
        for connection in connections:
            with contextlib.suppress(Exception):  # it may have just been returned
                _cancel(connection)
        return len(connections)

    def close(self) -> None:
        """Stop tracking the engine's connections."""
        with contextlib.suppress(sa.exc.InvalidRequestError):
            sa.event.remove(self.engine, "checkout", self._checkout)
            sa.event.remove(self.engine, "checkin", self._checkin)
