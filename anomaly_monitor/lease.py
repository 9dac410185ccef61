"""One active worker per monitor: a lease row with a fencing token, on any database.

The lease lives on the monitor's ``am_cursors`` row. A worker claims it when it
is free or expired, which increments ``lease_token``; it renews it while it
works. Every batch commits only if the cursor row still carries the worker's
owner and token, so a leader that was paused past its lease (and replaced)
cannot commit when it wakes up. Times come from the workers' clocks, which
must agree to well within the lease duration (NTP).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from anomaly_monitor.tables import as_utc, cursors, utcnow


@dataclass(frozen=True)
class Lease:
    """A held lease: who holds it and the fencing token of this tenure."""

    monitor: str
    owner: str
    token: int


@dataclass(frozen=True)
class Claim:
    """The outcome of :func:`claim`: the lease, or who holds it instead."""

    lease: Lease | None
    cursor_exists: bool
    holder: str | None = None
    expires_at: dt.datetime | None = None


def worker_identity() -> str:
    """A name for this worker process that is unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _renew(connection: sa.Connection, lease: Lease, expires: dt.datetime) -> bool:
    result = connection.execute(
        cursors.update().where(cursors.c.monitor == lease.monitor,
                               cursors.c.lease_owner == lease.owner,
                               cursors.c.lease_token == lease.token)
        .values(lease_expires_at=expires)
    )
    return result.rowcount == 1


def claim(
    connection: sa.Connection,
    monitor: str,
    owner: str,
    seconds: float,
    held: Lease | None = None,
    *,
    now: dt.datetime | None = None,
) -> Claim:
    """Renew ``held`` or claim the monitor's lease if it is free or expired.

    Commit the connection's transaction to make the claim visible.
    """
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=seconds)
    if held is not None and _renew(connection, held, expires):
        return Claim(held, True)
    taken = connection.execute(
        cursors.update().where(
            cursors.c.monitor == monitor,
            # Our own earlier tenure (after a conflict) is retaken with a new token.
            sa.or_(cursors.c.lease_owner.is_(None), cursors.c.lease_owner == owner,
                   cursors.c.lease_expires_at.is_(None), cursors.c.lease_expires_at < now))
        .values(lease_owner=owner, lease_token=cursors.c.lease_token + 1,
                lease_expires_at=expires)
    )
    row = connection.execute(
        sa.select(cursors.c.lease_owner, cursors.c.lease_token, cursors.c.lease_expires_at)
        .where(cursors.c.monitor == monitor)
    ).first()
    if row is None:
        return Claim(None, False)
    if taken.rowcount == 1 and row.lease_owner == owner:
        return Claim(Lease(monitor, owner, int(row.lease_token)), True)
    return Claim(None, True, row.lease_owner, as_utc(row.lease_expires_at))


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
