"""The queries the readers run, built from the reflected table's ``Column`` objects.

The window query takes the cursor position as a parameter. The plain path binds
it (SQLAlchemy caches the compiled statement; the driver may prepare it). The Arrow
path compiles the same select once per shape with the position marked
``literal_execute`` and asks the compiled statement for its SQL with the value in
place (:meth:`WindowQuery.sql`): SQLAlchemy's BIGINT literal renderer writes it,
from a Python integer only. The value is rendered there rather than bound because
PostgreSQL's ADBC driver reads through binary ``COPY``, 1.5 times as fast as its
prepared-statement path, only for a query without parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler

from anomaly_monitor.reading.horizon import horizon_columns

if TYPE_CHECKING:
    from anomaly_monitor.source import SourceTable

AFTER = "after_id"


def raw(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """``column`` as the driver gives it, so that a malformed value reaches the
    quarantine (or a ``None`` timestamp) instead of failing in a result processor."""
    return sa.type_coerce(column, sa.types.NullType()).label(column.name)


def select_rows(source: SourceTable, features: Sequence[str],
                label: sa.Column[Any] | None = None) -> sa.Select[Any]:
    """Id, timestamp, ``label`` when given, then the ``features`` (checked numeric)."""
    columns = [source.id_column, raw(source.timestamp_column)]
    if label is not None:
        columns.append(raw(label))
    columns += [raw(c) for c in source.feature_columns(features)]
    return sa.select(*columns)


@dataclass(frozen=True)
class WindowQuery:
    """Up to ``limit`` rows with id above a position, in id order; with ``hold_back``
    (PostgreSQL) each row's ``xmin`` and the snapshot's horizon as the last two columns.

    ``statement`` binds the position (the plain path: the driver may prepare it);
    ``rendered`` has it rendered at execution (the Arrow path, :meth:`sql`).
    """

    source: SourceTable
    features: tuple[str, ...]
    limit: int
    hold_back: bool = False
    statement: sa.Select[Any] = field(init=False, repr=False, compare=False)
    rendered: sa.Select[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "statement", self._build(literal=False))
        object.__setattr__(self, "rendered", self._build(literal=True))

    def _build(self, *, literal: bool) -> sa.Select[Any]:
        source = self.source
        after = sa.bindparam(AFTER, type_=sa.BigInteger, literal_execute=literal)
        query = select_rows(source, self.features).where(source.id_column > after) \
            .order_by(source.id_column)
        if literal:  # SQLite binds an OFFSET after a rendered LIMIT: render both
            query = query.limit(sa.bindparam("limit", self.limit, type_=sa.Integer,
                                             literal_execute=True)) \
                .offset(sa.bindparam("offset", 0, type_=sa.Integer, literal_execute=True))
        else:
            query = query.limit(self.limit)
        return query.add_columns(*horizon_columns()) if self.hold_back else query

    @property
    def key(self) -> Hashable:
        """Names the query's shape: equal keys, equal SQL for equal positions."""
        source = self.source
        return (source.table.fullname, source.id_column.name, source.timestamp_column.name,
                self.features, self.limit, self.hold_back)

    @staticmethod
    def params(after_id: int) -> dict[str, int]:
        """The parameters of :attr:`statement` for the rows after ``after_id``."""
        return {AFTER: operator.index(after_id)}

    def compile(self, dialect: sa.Dialect) -> SQLCompiler:
        """:attr:`rendered` compiled for ``dialect``, for :meth:`sql`."""
        return cast(SQLCompiler, self.rendered.compile(dialect=dialect))

    @staticmethod
    def sql(compiled: SQLCompiler, after_id: int) -> str:
        """The SQL text of ``compiled`` for the rows after ``after_id``, the value
        rendered by the dialect (``TypeError`` for anything but an integer; a
        ``ValueError`` if a parameter is left bound)."""
        expanded = compiled.construct_expanded_state({AFTER: operator.index(after_id)})
        if expanded.parameters:
            raise ValueError(f"the query still binds {sorted(expanded.parameters)}")
        return str(expanded.statement)
