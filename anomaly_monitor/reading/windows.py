"""Reading a monitor's next window: either reader, one rule for where a window stops.

A window is up to ``limit`` rows after the cursor, in id order. The plain reader
(:class:`~anomaly_monitor.reading.plain.PlainPage`) runs the query through
SQLAlchemy; the Arrow reader (:class:`~anomaly_monitor.reading.arrow.ArrowReader`)
runs the same query through ADBC and falls back to the plain one whenever it cannot.
Both return a :class:`Page`, and :func:`window_end` decides where the window stops.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.reading.horizon import first_held
from anomaly_monitor.reading.plain import PlainPage
from anomaly_monitor.reading.query import WindowQuery
from anomaly_monitor.reading.values import Window

if TYPE_CHECKING:
    from anomaly_monitor.reading.arrow import ArrowReader
    from anomaly_monitor.source import SourceTable


class Page(Protocol):
    """The result of one window query, before it is cut and converted."""

    ids: npt.NDArray[np.int64]
    #: PostgreSQL with ``hold_back``: each row's ``xmin`` and the snapshot's horizon.
    xmins: npt.NDArray[np.int64] | None
    horizon: int | None
    #: How long before its use the page's read began (a page read ahead is older).
    age_seconds: float

    def first_young(self, ready_before: dt.datetime, stop: int,
                    future_from: dt.datetime | None = None) -> int:
        """The index of the first row not older than ``ready_before`` and not stamped
        at or after ``future_from`` (only the first ``stop`` rows need be looked at);
        the number of rows when there is none."""
        ...

    def window(self, stop: int) -> Window:
        """The first ``stop`` rows as a :class:`Window`."""
        ...


def window_end(page: Page, ready_before: dt.datetime | None,
               future_from: dt.datetime | None = None) -> tuple[int, int | None]:
    """Where the window stops, and the id the horizon held back (``None`` when it did not).

    The window ends before the first row written by a transaction not committed
    before the snapshot's horizon (a row with a lower id may still be in flight) and
    before the first row not older than ``ready_before``, whichever comes first.
    ``ready_before`` is moved back by the page's age, so that a page read ahead is
    judged by when it was read. A row stamped at or after ``future_from`` does not
    end the window: it is mis-stamped, and waiting for it would wait until then.
    """
    n = len(page.ids)
    held = (n if page.xmins is None or page.horizon is None
            else first_held(page.xmins, page.horizon))
    young = n
    if ready_before is not None:
        ready_before -= dt.timedelta(seconds=page.age_seconds)
        young = page.first_young(ready_before, min(held + 1, n), future_from)
    return (held, int(page.ids[held])) if held < young else (young, None)


def read_window(
    connection: sa.Connection,
    source: SourceTable,
    after_id: int,
    limit: int,
    *,
    features: Sequence[str] | None = None,
    ready_before: dt.datetime | None = None,
    future_from: dt.datetime | None = None,
    hold_back: bool = False,
    arrow: ArrowReader | None = None,
    plain: bool = False,
    read_ahead: bool = True,
) -> Window:
    """Up to ``limit`` rows with id above ``after_id``, in id order.

    With ``ready_before``, the window stops at the first row whose timestamp is
    not older than it (and not at or after ``future_from``). With ``hold_back``
    (PostgreSQL), it also stops at the first row written by a transaction at or
    after the oldest one still open (:func:`window_end`): the snapshot's *horizon*,
    a transaction id, is in ``Window.horizon``, and ``Window.held_back`` is the id
    where it stopped the window.
    With ``arrow``, the rows are read through its ADBC connection when it can; with
    ``plain`` too, this window is read by the plain path (it is expected to be small)
    and, if it comes back full, the next one is read ahead through ``arrow`` (unless
    not ``read_ahead``: the caller will not read it soon).
    """
    query = WindowQuery(source, tuple(source.features if features is None else features),
                        limit, hold_back)
    page: Page | None = None if arrow is None or plain else arrow.read(query, after_id)
    if page is None:
        page = PlainPage.read(connection, query, after_id)
    stop, held_back = window_end(page, ready_before, future_from)
    if arrow is not None and read_ahead and stop == len(page.ids) == limit:  # a backlog
        arrow.read_ahead(query, int(page.ids[-1]))
    window = page.window(stop)
    window.held_back, window.horizon = held_back, page.horizon
    return window
