"""A window monitor's entities in SQL: the entity of each source row, and the
per-entity states (``am_entity_states``) read before a batch and written in its
transaction.

The entity key of a row is its ``entity_column`` value as text (cut to
``ENTITY_LENGTH`` characters; NULL is the key ``""``); a monitor without
``entity_column`` has the one entity ``""``. States are kept per model version: a
version's calibration is of its own scores.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.reading.values import Window
from anomaly_monitor.registry import LoadedModel
from anomaly_monitor.scoring import StreamContext
from anomaly_monitor.source import SchemaError, SourceTable
from anomaly_monitor.tables import ENTITY_LENGTH, entity_states, trained_states
from anomaly_monitor.windows import EntityState, WindowSpec

#: Keys per ``IN`` list when states or rows are read by key.
KEYS_PER_QUERY = 500


def entity_key(value: Any) -> str:
    """The entity key of an ``entity_column`` value."""
    return "" if value is None else str(value)[:ENTITY_LENGTH]


def row_entities(connection: sa.Connection, source: SourceTable,
                 ids: npt.NDArray[np.int64]) -> tuple[list[str], dict[str, Any]]:
    """The entity key of each of ``ids`` (in that order) and one raw value per key.

    Contiguous-ish ids are read as one id range; a few scattered ids (late rows) by
    ``IN`` lists."""
    if source.entity_column is None or len(ids) == 0:
        return [""] * len(ids), {"": None}
    column, key_col = source.entity_column, source.id_column
    low, high = int(ids.min()), int(ids.max())
    found: dict[int, Any] = {}
    if high - low + 1 <= 4 * len(ids):
        query = sa.select(key_col, column).where(key_col >= low, key_col <= high)
        found = {int(i): v for i, v in connection.execute(query)}
    else:
        for start in range(0, len(ids), KEYS_PER_QUERY):
            chunk = [int(i) for i in ids[start:start + KEYS_PER_QUERY]]
            found.update({int(i): v for i, v in connection.execute(
                sa.select(key_col, column).where(key_col.in_(chunk)))})
    keys = [entity_key(found.get(int(i))) for i in ids]
    raw = {entity_key(v): v for v in found.values()}
    return keys, raw


def read_states(connection: sa.Connection, monitor: str, version: int,
                keys: Iterable[str], spec: WindowSpec) -> dict[str, EntityState]:
    """The stored states of ``keys`` under ``version`` (absent keys: new entities)."""
    wanted = sorted(set(keys))
    states: dict[str, EntityState] = {}
    for start in range(0, len(wanted), KEYS_PER_QUERY):
        rows = connection.execute(
            sa.select(entity_states.c.entity, entity_states.c.state,
                      entity_states.c.last_id).where(
                entity_states.c.monitor == monitor, entity_states.c.version == version,
                entity_states.c.entity.in_(wanted[start:start + KEYS_PER_QUERY])))
        for key, data, last_id in rows:
            try:
                states[key] = EntityState.unpack(bytes(data), spec)
                states[key].last_id = None if last_id is None else int(last_id)
            except ValueError as exc:
                raise SchemaError(
                    f"monitor {monitor!r}: the stored state of entity {key!r} under model "
                    f"version {version} is unreadable ({exc}); retrain with: "
                    f"anomaly-monitor train {monitor}") from None
    return states


def write_states(connection: sa.Connection, monitor: str, version: int,
                 states: dict[str, EntityState], now: dt.datetime, *,
                 trained: bool = False) -> None:
    """Replace the stored states of ``states``' keys (inside the caller's transaction);
    ``trained``: a new version's, also kept as trained (``am_trained_states``)."""
    keys = sorted(states)
    for start in range(0, len(keys), KEYS_PER_QUERY):
        connection.execute(entity_states.delete().where(
            entity_states.c.monitor == monitor, entity_states.c.version == version,
            entity_states.c.entity.in_(keys[start:start + KEYS_PER_QUERY])))
    rows = [{"monitor": monitor, "version": version, "entity": key,
             "samples": states[key].samples, "state": states[key].pack(),
             "last_id": states[key].last_id} for key in keys]
    if rows:
        connection.execute(entity_states.insert(), [{**r, "updated_at": now} for r in rows])
        if trained:
            connection.execute(trained_states.insert(), rows)


def read_trained_states(connection: sa.Connection, monitor: str, version: int,
                        spec: WindowSpec) -> dict[str, EntityState] | None:
    """Every entity's state as ``version`` was trained to; ``None`` for a version
    trained before these were kept."""
    states: dict[str, EntityState] = {}
    for key, data, last_id in connection.execute(
            sa.select(trained_states.c.entity, trained_states.c.state,
                      trained_states.c.last_id).where(
                trained_states.c.monitor == monitor, trained_states.c.version == version)):
        states[key] = EntityState.unpack(bytes(data), spec)
        states[key].last_id = None if last_id is None else int(last_id)
    return states or None


def count_entities(connection: sa.Connection, monitor: str, version: int) -> int:
    """Entities with a state under ``version``."""
    return int(connection.execute(
        sa.select(sa.func.count()).select_from(entity_states).where(
            entity_states.c.monitor == monitor, entity_states.c.version == version)
    ).scalar() or 0)


def context_before(connection: sa.Connection, source: SourceTable, entity: Any,
                   before_id: int, size: int, features: Sequence[str]
                   ) -> npt.NDArray[np.float64]:
    """The values of the ``size`` scorable samples of ``entity`` before id
    ``before_id``, oldest first: the window a late row would have had."""
    if size == 0:
        return np.zeros((0, len(features)))
    columns = source.feature_columns(features)
    query = sa.select(*columns)
    if source.entity_column is not None:
        query = query.where(source.entity_column.is_(None) if entity is None
                            else source.entity_column == entity)
    query = query.where(source.id_column < before_id, *(c.is_not(None) for c in columns)) \
        .order_by(source.id_column.desc()).limit(size)
    rows = connection.execute(query).all()
    values = []
    for row in reversed(rows):
        try:
            sample = [float(v) for v in row]
        except (TypeError, ValueError):
            continue
        if all(np.isfinite(sample)):
            values.append(sample)
    return np.asarray(values, dtype=np.float64).reshape(-1, len(features))


def stream_context(connection: sa.Connection, source: SourceTable, model: LoadedModel,
                   window: Window, *, late: bool = False) -> StreamContext | None:
    """What a window monitor scores ``window`` with (``None`` for a row monitor): its
    rows' entities and their states; with ``late`` (rows behind the cursor), each row's
    window read from the source and states that do not move."""
    spec = model.window
    if spec is None:
        return None
    keys, raw = row_entities(connection, source, window.ids)
    states = read_states(connection, model.version.monitor, model.version.version, keys, spec)
    stream = StreamContext(keys, states)
    # Late rows, and rows their entity's state has learned already, get their own window.
    again = [i for i in range(len(window.ids)) if late or (
        (state := states.get(keys[i])) is not None and state.last_id is not None
        and int(window.ids[i]) <= state.last_id)]
    stream.contexts = {
        i: context_before(connection, source, raw.get(keys[i]), int(window.ids[i]),
                          spec.size, spec.features)
        for i in again}
    return stream


def state_writer(model: LoadedModel, stream: StreamContext | None, now: dt.datetime
                 ) -> Callable[[sa.Connection], None] | None:
    """The batch transaction's write of the states ``stream`` moved to, if any."""
    if stream is None or not stream.moved:
        return None

    def write(connection: sa.Connection) -> None:
        write_states(connection, model.version.monitor, model.version.version,
                     {key: stream.states[key] for key in stream.moved}, now)

    return write
