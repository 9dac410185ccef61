"""The ``am_cursors`` row of each monitor: its position, pause state and lease.

This module is the only writer of the row. The position is the last source id
scored; a paused monitor records why. One active worker per monitor: the lease
lives on the same row. A worker claims it when it
is free, expired or held by a dead leader, which increments ``lease_token``; it
renews it while it works. Every batch commits only if the cursor row still
carries the worker's owner and token, so a leader that was paused past its
lease (and replaced) cannot commit when it wakes up.

Lease times come from the database's clock, inside the claim and renew
statements (``statement_timestamp()`` on PostgreSQL, ``'now'`` on SQLite):
workers whose clocks disagree still agree on who leads. A leader is known dead,
and taken over at once, when its owner names a process of this host that no
longer runs; on PostgreSQL also when it has missed a renewal and none of its
database sessions is left; otherwise its lease expires after ``lease_seconds``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from anomaly_monitor.identity import local_process_dead, parse_owner, worker_identity
from anomaly_monitor.tables import Timestamp, as_utc, batches, cursors, standbys, utcnow

__all__ = ["BatchConflictError", "Claim", "CursorState", "Lease", "LeaseHeldError", "Reset",
           "claim", "create_cursor", "fence", "fenced", "forget_standby", "lease_holder",
           "list_standbys", "note_standby", "read_cursor", "release", "reset_cursor",
           "set_paused", "worker_identity"]


class BatchConflictError(RuntimeError):
    """The cursor moved while the batch was scored; the batch was rolled back."""


@dataclass(frozen=True)
class CursorState:
    """A monitor's row in ``am_cursors``."""

    position: int
    paused: bool
    pause_reason: str | None
    updated_at: dt.datetime | None
    generation: int = 0
    #: The source timestamp of the row at ``position`` when the cursor moved there.
    position_timestamp: dt.datetime | None = None


def read_cursor(connection: sa.Connection, monitor: str) -> CursorState | None:
    """The monitor's cursor, ``None`` before its first model is activated."""
    row = connection.execute(
        sa.select(cursors.c.position, cursors.c.paused, cursors.c.pause_reason,
                  cursors.c.updated_at, cursors.c.generation, cursors.c.position_timestamp)
        .where(cursors.c.monitor == monitor)
    ).first()
    if row is None:
        return None
    return CursorState(int(row.position), bool(row.paused), row.pause_reason,
                       as_utc(row.updated_at), int(row.generation),
                       as_utc(row.position_timestamp))


def lease_holder(connection: sa.Connection, monitor: str) -> dict[str, Any] | None:
    """Who holds the monitor's lease and until when (database clock; ``expired`` when
    that time has passed); ``None`` when the lease is free or there is no cursor."""
    row = connection.execute(
        sa.select(cursors.c.lease_owner, cursors.c.lease_token, cursors.c.lease_expires_at,
                  (cursors.c.lease_expires_at < database_time()).label("expired"),
                  database_time().label("now"))
        .where(cursors.c.monitor == monitor)
    ).first()
    if row is None or row.lease_owner is None:
        return None
    expires = as_utc(row.lease_expires_at)
    now = as_utc(row.now)
    return {"owner": row.lease_owner, "token": int(row.lease_token),
            "expires_at": expires.isoformat() if expires else None,
            "expired": bool(row.expired) if row.expired is not None else True,
            # On the database clock, like the expiry: this host's clock plays no part.
            "seconds_left": round((expires - now).total_seconds(), 1)
            if expires is not None and now is not None else None}


def create_cursor(connection: sa.Connection, monitor: str, position: Callable[[], int],
                  now: dt.datetime) -> bool:
    """Create the monitor's cursor at ``position()`` unless it exists (``position`` is
    called only then); whether it was created."""
    exists = connection.execute(
        sa.select(cursors.c.monitor).where(cursors.c.monitor == monitor)
    ).first()
    if exists is not None:
        return False
    connection.execute(cursors.insert().values(
        monitor=monitor, position=position(), paused=False, updated_at=now))
    return True


def set_paused(connection: sa.Connection, monitor: str, reason: str | None) -> None:
    """Pause the monitor with ``reason``, or resume it when ``reason`` is ``None``."""
    connection.execute(
        cursors.update().where(cursors.c.monitor == monitor)
        .values(paused=reason is not None, pause_reason=reason, updated_at=utcnow())
    )


class database_time(FunctionElement[dt.datetime]):  # noqa: N801 (an SQL function)
    """The database's current time plus ``seconds``, in the column format of
    ``Timestamp`` (SQLite stores text that must compare as ``Timestamp`` values do)."""

    type = Timestamp
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(sa.literal(float(seconds), sa.Float))


@compiles(database_time, "postgresql")
def _postgresql_time(element: database_time, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(statement_timestamp() + make_interval(secs => {seconds}))"


@compiles(database_time, "sqlite")
def _sqlite_time(element: database_time, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    # 'YYYY-MM-DD HH:MM:SS.SSS' padded to microseconds: SQLAlchemy's own text format.
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', ({seconds}) || ' seconds')"


@compiles(database_time)
def _unsupported_time(element: database_time, compiler: Any, **kw: Any) -> str:
    raise sa.exc.CompileError(f"leases need SQLite or PostgreSQL, not {compiler.dialect.name}")


@dataclass(frozen=True)
class Lease:
    """A held lease: who holds it and the fencing token of this tenure."""

    monitor: str
    owner: str
    token: int


@dataclass(frozen=True)
class Claim:
    """The outcome of :func:`claim`: the lease, or who holds it instead.

    ``taken_from`` names the dead leader a new lease was taken over from at once.
    """

    lease: Lease | None
    cursor_exists: bool
    holder: str | None = None
    expires_at: dt.datetime | None = None
    taken_from: str | None = None


def _renew(connection: sa.Connection, lease: Lease, seconds: float) -> bool:
    result = connection.execute(
        cursors.update().where(cursors.c.monitor == lease.monitor,
                               cursors.c.lease_owner == lease.owner,
                               cursors.c.lease_token == lease.token)
        .values(lease_expires_at=database_time(seconds))
    )
    return result.rowcount == 1


#: A leader renews at least every ``renew_period`` seconds (see :func:`claim`); one whose
#: last renewal is older than this many renew periods has missed one.
OVERDUE_RENEWALS = 1.5


def _sessions_gone(connection: sa.Connection, application_name: str) -> bool:
    """Whether PostgreSQL shows no session named ``application_name``; ``False`` when the
    server will not say (the query runs in a savepoint so that an error cannot abort
    the claim's transaction)."""
    activity = sa.table("pg_stat_activity", sa.column("application_name"),
                        schema="pg_catalog")
    try:
        with connection.begin_nested():
            found = connection.execute(
                sa.select(sa.literal(1)).select_from(activity)
                .where(activity.c.application_name == application_name).limit(1)
            ).first()
    except sa.exc.DBAPIError:
        return False
    return found is None


def leader_dead(connection: sa.Connection, owner: str, overdue: bool) -> bool:
    """Whether the worker ``owner`` is known to be gone: a process of this host that no
    longer runs; or, on PostgreSQL, a leader that is ``overdue`` (missed a renewal) and
    has no session left. Both are needed there: behind a transaction-mode pooler, or
    while a live leader is idle without a pooled connection, its sessions cannot be
    seen, but it still renews on time."""
    parsed = parse_owner(owner)
    if parsed is None:
        return False
    if local_process_dead(parsed):
        return True
    return (overdue and connection.dialect.name == "postgresql"
            and _sessions_gone(connection, parsed.application_name))


def claim(
    connection: sa.Connection,
    monitor: str,
    owner: str,
    seconds: float,
    held: Lease | None = None,
    *,
    renew_period: float | None = None,
) -> Claim:
    """Renew ``held``, or claim the monitor's lease if it is free, expired or its
    holder is dead. ``renew_period`` is how often a live leader renews (default a
    third of ``seconds``). Commit the connection's transaction to make the claim
    visible."""
    if held is not None and _renew(connection, held, seconds):
        return Claim(held, True)
    renew_period = seconds / 3 if renew_period is None else renew_period
    row = connection.execute(
        sa.select(cursors.c.lease_owner, cursors.c.lease_token, cursors.c.lease_expires_at,
                  (cursors.c.lease_expires_at < database_time()).label("expired"),
                  # Renewed longer ago than a live leader would let pass:
                  (cursors.c.lease_expires_at
                   < database_time(seconds - OVERDUE_RENEWALS * renew_period)).label("overdue"))
        .where(cursors.c.monitor == monitor)
    ).first()
    if row is None:
        return Claim(None, False)
    holder = row.lease_owner
    # Free: nobody, our own earlier tenure (retaken with a new token), or expired.
    free = holder is None or holder == owner or row.lease_expires_at is None or row.expired
    dead = not free and leader_dead(connection, holder, bool(row.overdue))
    if free or dead:
        # Compare-and-set on the token and the state just read: of two successors
        # (or a successor and a renewing leader) only one update matches.
        still = (cursors.c.lease_owner == holder if dead else sa.or_(
            cursors.c.lease_owner.is_(None), cursors.c.lease_owner == owner,
            cursors.c.lease_expires_at.is_(None),
            cursors.c.lease_expires_at < database_time()))
        taken = connection.execute(
            cursors.update().where(cursors.c.monitor == monitor,
                                   cursors.c.lease_token == row.lease_token, still)
            .values(lease_owner=owner, lease_token=cursors.c.lease_token + 1,
                    lease_expires_at=database_time(seconds))
        )
        if taken.rowcount == 1:
            return Claim(Lease(monitor, owner, int(row.lease_token) + 1), True,
                         taken_from=holder if dead else None)
        row = connection.execute(
            sa.select(cursors.c.lease_owner, cursors.c.lease_expires_at)
            .where(cursors.c.monitor == monitor)
        ).one()
    return Claim(None, True, row.lease_owner, as_utc(row.lease_expires_at))


def note_standby(connection: sa.Connection, monitor: str, owner: str,
                 forget_after: float) -> None:
    """Record that ``owner`` stands by for the monitor's lease (now, database clock),
    and forget the standbys of the monitor not seen for ``forget_after`` seconds
    (workers that died without removing their row)."""
    connection.execute(standbys.delete().where(
        standbys.c.monitor == monitor, standbys.c.seen_at < database_time(-forget_after)))
    updated = connection.execute(
        standbys.update().where(standbys.c.monitor == monitor, standbys.c.owner == owner)
        .values(seen_at=database_time()))
    if updated.rowcount == 0:  # only this worker writes its own row: no race to insert
        connection.execute(standbys.insert().values(monitor=monitor, owner=owner,
                                                    seen_at=database_time()))


def forget_standby(connection: sa.Connection, monitor: str, owner: str) -> None:
    """``owner`` no longer stands by for the monitor (it leads, or it stopped)."""
    connection.execute(standbys.delete().where(standbys.c.monitor == monitor,
                                               standbys.c.owner == owner))


def list_standbys(connection: sa.Connection, monitor: str, within: float) -> list[dict[str, Any]]:
    """The workers that stood by for the monitor in the last ``within`` seconds
    (database clock), most recently seen first, apart from the lease holder."""
    holder = sa.select(cursors.c.lease_owner).where(cursors.c.monitor == monitor,
                                                    cursors.c.lease_owner.is_not(None))
    rows = connection.execute(
        sa.select(standbys.c.owner, standbys.c.seen_at, database_time().label("now"))
        .where(standbys.c.monitor == monitor, standbys.c.seen_at >= database_time(-within),
               standbys.c.owner.not_in(holder))
        .order_by(standbys.c.seen_at.desc())).all()
    return [{"owner": r.owner, "seen_at": as_utc(r.seen_at).isoformat(),
             "seconds_ago": max(0.0, round((as_utc(r.now) - as_utc(r.seen_at))
                                           .total_seconds(), 1))} for r in rows]


def release(connection: sa.Connection, lease: Lease) -> None:
    """Give the lease up (on a clean stop) so that a standby takes over at once."""
    connection.execute(
        cursors.update().where(cursors.c.monitor == lease.monitor,
                               cursors.c.lease_owner == lease.owner,
                               cursors.c.lease_token == lease.token)
        .values(lease_owner=None, lease_expires_at=None)
    )


def fenced(lease: Lease | None) -> list[sa.ColumnElement[bool]]:
    """Conditions that hold on the cursor row only while ``lease`` is still current."""
    if lease is None:
        return []
    return [cursors.c.lease_owner == lease.owner, cursors.c.lease_token == lease.token]


def fence(
    connection: sa.Connection, monitor: str, lease: Lease | None, now: dt.datetime,
    position: int | None = None, new_position: int | None = None,
    new_position_timestamp: dt.datetime | None = None, *, generation: int | None = None,
    rows: int = 0,
) -> None:
    """Touch the cursor row (and move it from ``position`` to ``new_position``, whose
    row has ``new_position_timestamp``; and count ``rows`` consumed) if the lease, the
    position and the generation still hold; else raise :class:`BatchConflictError`,
    whose caller rolls the batch back (a batch or sweep read before a cursor reset
    never commits after it)."""
    conditions = [cursors.c.monitor == monitor, cursors.c.paused == sa.false(), *fenced(lease)]
    if generation is not None:
        conditions.append(cursors.c.generation == generation)
    values: dict[str, Any] = {"updated_at": now}
    if rows:
        values["rows_consumed"] = cursors.c.rows_consumed + rows
    if position is not None:
        conditions.append(cursors.c.position == position)
        values["position"] = new_position
        values["position_timestamp"] = new_position_timestamp
    if connection.execute(cursors.update().where(*conditions).values(**values)).rowcount != 1:
        raise BatchConflictError(
            f"monitor {monitor!r}: {_conflict(connection, monitor, lease, position)}; "
            "the batch was rolled back")


def _conflict(connection: sa.Connection, monitor: str, lease: Lease | None,
              position: int | None) -> str:
    """Why the fenced update of the cursor matched nothing."""
    row = connection.execute(
        sa.select(cursors.c.position, cursors.c.paused, cursors.c.lease_owner,
                  cursors.c.lease_token).where(cursors.c.monitor == monitor)).first()
    if row is None:
        return "the cursor row is gone"
    if lease is not None and (row.lease_owner, row.lease_token) != (lease.owner, lease.token):
        return (f"this worker's lease (token {lease.token}) was taken over by "
                f"{row.lease_owner} (token {row.lease_token})")
    if row.paused:
        return "the monitor was paused"
    if position is None:
        return "the cursor was reset (a new generation)"
    return f"the cursor moved from {position} to {row.position}"


def _close_gaps_above(connection: sa.Connection, monitor: str, position: int) -> int:
    """Drop the open gap ranges above ``position`` (their ids now name other rows, or
    will be read after the cursor); those below stay open. Returns the batches changed."""
    changed = 0
    for row in connection.execute(
            sa.select(batches.c.id, batches.c.open_gaps)
            .where(batches.c.monitor == monitor, batches.c.open_gaps.is_not(None))).all():
        left = [[a, min(b, position)] for a, b in row.open_gaps if a <= position]
        if left != row.open_gaps:
            connection.execute(batches.update().where(batches.c.id == row.id)
                               .values(open_gaps=left or None))
            changed += 1
    return changed


class LeaseHeldError(RuntimeError):
    """A live worker holds the monitor's lease (see :func:`reset_cursor`)."""


@dataclass(frozen=True)
class Reset:
    """What :func:`reset_cursor` did."""

    old_position: int
    new_position: int
    old_generation: int
    new_generation: int
    was_paused: bool
    lease_taken_from: str | None
    gaps_closed: int


def reset_cursor(connection: sa.Connection, monitor: str, position: int, *,
                 force: bool = False, skipped_rows: int = 0) -> Reset:
    """Move the monitor's cursor to ``position`` (rows with higher ids are scored next)
    and resume it.

    Moving it back starts a new *generation*: the rows scored from there are flagged
    and quarantined under it, so that a table whose ids restarted has its new rows
    recorded beside (not instead of) the old ones; the old batches' open id gaps are
    closed above the new position (their ids now name other rows). The lease token
    rises, so that no worker that read before the reset commits after it. Raises
    :class:`LeaseHeldError` while a live worker holds the lease of a monitor that is
    not paused, unless ``force``: the lease is then taken from it, and its current
    batch rolls back. Raises ``LookupError`` when the monitor has no cursor yet.
    Moving it forward skips ``skipped_rows`` rows: counted as consumed, so that they are
    not reported as rows written below the cursor (rows already there still are).
    """
    row = connection.execute(
        sa.select(cursors.c.position, cursors.c.generation, cursors.c.paused,
                  cursors.c.lease_owner, cursors.c.lease_expires_at,
                  (cursors.c.lease_expires_at < database_time()).label("expired"))
        .where(cursors.c.monitor == monitor).with_for_update()
    ).first()
    if row is None:
        raise LookupError(f"monitor {monitor!r} has no cursor yet (no model was activated)")
    live = row.lease_owner is not None and row.lease_expires_at is not None \
        and not row.expired and not leader_dead(connection, row.lease_owner, False)
    if live and not row.paused and not force:
        raise LeaseHeldError(
            f"monitor {monitor!r}: worker {row.lease_owner} is scoring it (lease until "
            f"{as_utc(row.lease_expires_at)}, database clock); stop it first, or use "
            "--force (its current batch then rolls back)")
    taken = live and not row.paused
    back = position < int(row.position)
    generation = int(row.generation) + (1 if back else 0)
    # The token rises whoever held the lease: a worker that read before the reset (even
    # one frozen past its lease) cannot commit after it; a live one claims it again.
    connection.execute(cursors.update().where(cursors.c.monitor == monitor).values(
        position=position, generation=generation, position_timestamp=None, paused=False,
        pause_reason=None, updated_at=utcnow(), lease_owner=None, lease_expires_at=None,
        lease_token=cursors.c.lease_token + 1,
        # A new generation counts rows below the cursor afresh; a skip is no such row.
        **({"rows_consumed": 0, "below_floor": None, "rows_below": None,
            "below_checked_at": None} if back else
           {"rows_consumed": cursors.c.rows_consumed + skipped_rows})))
    closed = _close_gaps_above(connection, monitor, position) if back else 0
    return Reset(int(row.position), position, int(row.generation), generation,
                 bool(row.paused), row.lease_owner if taken else None, closed)
