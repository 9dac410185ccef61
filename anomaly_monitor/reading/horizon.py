"""PostgreSQL's transaction horizon: which rows a window may safely include.

A row with a lower id may still be in flight in a transaction that is open while a
window is read; reading past a row written at or after the oldest open transaction
would let that row land below the cursor unseen. Each window query therefore also
returns each row's ``xmin`` and the snapshot's horizon (``pg_snapshot_xmin``), and
the window stops at the first row not committed before the horizon.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

XID_MODULUS = 2**32
FIRST_NORMAL_XID = 3


def _bigint(expression: str) -> sa.ColumnElement[int]:
    # xid8 and xid have no cast to bigint; their text form does.
    return sa.cast(sa.cast(sa.literal_column(expression), sa.Text), sa.BigInteger)


def horizon_columns() -> list[sa.ColumnElement[int]]:
    """Each row's ``xmin``, and the statement snapshot's horizon (the oldest
    transaction still running, ``pg_snapshot_xmin``), as the last two columns."""
    return [_bigint("xmin").label("_xmin"),
            _bigint("pg_snapshot_xmin(pg_current_snapshot())").label("_horizon")]


def committed_mask(xids: npt.ArrayLike, horizon: int) -> npt.NDArray[np.bool_]:
    """Which 32-bit transaction ids precede the 64-bit ``horizon`` (mod 2**32); frozen
    and bootstrap ids always do."""
    xids = np.asarray(xids, dtype=np.int64)
    distance = (horizon - xids) % XID_MODULUS
    return (xids < FIRST_NORMAL_XID) | ((distance > 0) & (distance < XID_MODULUS // 2))


def committed_before(xid: int, horizon: int) -> bool:
    """Whether 32-bit transaction id ``xid`` precedes the 64-bit ``horizon`` (mod 2**32)."""
    return bool(committed_mask([xid], horizon)[0])


def first_held(xmins: npt.ArrayLike, horizon: int) -> int:
    """The index of the first row written by a transaction not committed before
    ``horizon`` (the number of rows when there is none)."""
    held = np.flatnonzero(~committed_mask(xmins, horizon))
    return int(held[0]) if held.size else len(np.asarray(xmins))
