"""The monitor's own tables (prefix ``am_``), created by the Alembic migrations.

The migrations in ``migrations/`` are the source of truth for the database; these
definitions must match them (a test compares the two on SQLite and PostgreSQL).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

#: JSON documents: JSONB on PostgreSQL, text on SQLite.
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: JSON whose Python ``None`` is SQL NULL (not the JSON value ``null``), for IS NULL tests.
NullableJson = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql")
Timestamp = sa.DateTime(timezone=True)
MONITOR_NAME_LENGTH = 64
#: Entity keys (a window monitor's entity_column values as text) are cut to this length.
ENTITY_LENGTH = 200
#: Who gave a label (``am_feedback.author``), at most this long.
AUTHOR_LENGTH = 200
#: ``am_anomalies.suppressed_by`` is cut to this length.
SUPPRESSED_BY_LENGTH = 100
#: ``shadow``: a challenger scoring beside the active version (at most one per monitor);
#: ``rejected``: a challenger an operator or its gates turned down.
VERSION_STATUSES = ("candidate", "active", "retired", "shadow", "rejected")
INCIDENT_STATES = ("open", "closed")
#: Operator labels of flags and incidents: true and false positive.
LABELS = ("tp", "fp")
#: The ``--label`` filter of the listings: a label, or ``none`` for unlabelled rows.
LABEL_FILTERS = (*LABELS, "none")
#: What a feedback row labels: one flagged row, or a whole incident (and its flags).
FEEDBACK_TARGETS = ("flag", "incident")


def _row_id() -> sa.Column[int]:
    """A 64-bit surrogate key (INTEGER on SQLite, where only that type autoincrements)."""
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                     primary_key=True, autoincrement=True)


model_versions = sa.Table(
    "am_model_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("features", Json, nullable=False),
    sa.Column("hyperparameters", Json, nullable=False),
    sa.Column("manifest", Json, nullable=False),
    # NULL once retention (keep_versions) removed it; ``pruned_at`` says when.
    sa.Column("artifact", sa.LargeBinary),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("threshold_method", sa.String(16), nullable=False),
    sa.Column("threshold_params", Json, nullable=False),
    sa.Column("severity_scale", Json, nullable=False),
    # Held-out calibration scores, float32 little-endian, sorted ascending.
    sa.Column("calibration_scores", sa.LargeBinary, nullable=False),
    sa.Column("training", Json, nullable=False),
    sa.Column("validation", Json, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("activated_at", Timestamp),
    sa.Column("pruned_at", Timestamp),
    sa.UniqueConstraint("monitor", "version"),
    sa.CheckConstraint(
        sa.column("status").in_(VERSION_STATUSES), name="status"
    ),
    sa.Index(
        "uq_am_model_versions_one_active", "monitor", unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    ),
    sa.Index(
        "uq_am_model_versions_one_shadow", "monitor", unique=True,
        sqlite_where=sa.text("status = 'shadow'"),
        postgresql_where=sa.text("status = 'shadow'"),
    ),
)

cursors = sa.Table(
    "am_cursors", metadata,
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("pause_reason", sa.Text),
    sa.Column("updated_at", Timestamp, nullable=False),
    # The lease: one worker scores a monitor; the token fences out a stale leader.
    sa.Column("lease_owner", sa.String(200)),
    sa.Column("lease_token", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_expires_at", Timestamp),
    # Raised by a cursor reset below the position (the table's ids restarted): the
    # flagged and quarantined rows are keyed by it.
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    # The source timestamp of the row at the position, to notice that it changed.
    sa.Column("position_timestamp", Timestamp),
    # Rows this generation consumed (every batch kind); the lowest "rows at or below
    # the position minus rows consumed" a check has seen; how far the last check found
    # it above that (rows written below the cursor), and when it ran.
    sa.Column("rows_consumed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("below_floor", sa.BigInteger),
    sa.Column("rows_below", sa.BigInteger),
    sa.Column("below_checked_at", Timestamp),
)

standbys = sa.Table(
    "am_standbys", metadata,
    # Workers standing by for a monitor's lease, and when each last said so (database
    # clock); shown by status, removed when the worker takes the lease or stops.
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), primary_key=True),
    sa.Column("owner", sa.String(200), primary_key=True),
    sa.Column("seen_at", Timestamp, nullable=False),
)

anomalies = sa.Table(
    "am_anomalies", metadata,
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("source_id", sa.BigInteger, nullable=False),
    sa.Column("source_timestamp", Timestamp),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("severity", sa.Float, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("contributions", Json, nullable=False),
    sa.Column("scored_at", Timestamp, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    # A window monitor's entity (its entity_column's value as text); NULL otherwise.
    sa.Column("entity", sa.String(ENTITY_LENGTH)),
    # The incident (am_incidents.id) the flag was grouped into, in the same transaction.
    sa.Column("incident_id", sa.BigInteger),
    # The current operator label (the newest feedback on the row or its incident; a
    # flag joining a labelled incident takes its label), NULL while unlabelled.
    sa.Column("label", sa.String(8)),
    # The suppression window the row's timestamp fell in ("window 3", "recurring
    # nightly"): the flag is kept out of incidents and alerts. NULL: not suppressed.
    sa.Column("suppressed_by", sa.String(SUPPRESSED_BY_LENGTH)),
    sa.UniqueConstraint("monitor", "generation", "source_id"),
    sa.Index("ix_am_anomalies_monitor_scored_at", "monitor", "scored_at"),
    sa.Index("ix_am_anomalies_monitor_entity", "monitor", "entity"),
    sa.Index("ix_am_anomalies_incident_id", "incident_id"),
    sa.Index("ix_am_anomalies_monitor_label", "monitor", "label"),
)

feedback = sa.Table(
    "am_feedback", metadata,
    # Every label an operator gave (anomaly_monitor.feedback), never updated: the newest
    # row of a target is its label, the older ones its history.
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("target", sa.String(8), nullable=False),
    # am_anomalies.id of a flag, am_incidents.id of an incident.
    sa.Column("target_id", sa.BigInteger, nullable=False),
    # The flag's source id (NULL for an incident), and its cursor generation.
    sa.Column("source_id", sa.BigInteger),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    sa.Column("label", sa.String(8), nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("author", sa.String(AUTHOR_LENGTH), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.CheckConstraint(sa.column("target").in_(FEEDBACK_TARGETS), name="target"),
    sa.CheckConstraint(sa.column("label").in_(LABELS), name="label"),
    sa.Index("ix_am_feedback_monitor_target_target_id", "monitor", "target", "target_id"),
    sa.Index("ix_am_feedback_monitor_label", "monitor", "label"),
)

incidents = sa.Table(
    "am_incidents", metadata,
    # Flags of one monitor and entity that follow each other within the monitor's gap
    # (anomaly_monitor.incidents), written in the batch transaction of their flags.
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    sa.Column("entity", sa.String(ENTITY_LENGTH)),
    sa.Column("first_source_id", sa.BigInteger, nullable=False),
    sa.Column("last_source_id", sa.BigInteger, nullable=False),
    sa.Column("first_timestamp", Timestamp),
    sa.Column("last_timestamp", Timestamp),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("max_severity", sa.Float, nullable=False),
    # Feature name (without its lag) -> the sum of its shares over the incident's flags.
    sa.Column("feature_shares", Json, nullable=False),
    sa.Column("state", sa.String(8), nullable=False),
    # The operator's label, tp or fp (issue 16's feedback), NULL while unlabelled.
    sa.Column("label", sa.String(8)),
    # The version that flagged the incident's first row.
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("opened_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Column("closed_at", Timestamp),
    sa.CheckConstraint(sa.column("state").in_(INCIDENT_STATES), name="state"),
    sa.CheckConstraint(sa.or_(sa.column("label").is_(None),
                              sa.column("label").in_(LABELS)), name="label"),
    sa.Index("ix_am_incidents_monitor_state_generation", "monitor", "state", "generation"),
    sa.Index("ix_am_incidents_monitor_generation_last_timestamp", "monitor", "generation",
             "last_timestamp"),
    sa.Index("ix_am_incidents_monitor_closed_at", "monitor", "closed_at"),
)

suppressions = sa.Table(
    "am_suppressions", metadata,
    # One-off suppression windows (anomaly-monitor suppress add); recurring ones are in
    # the config. A removed window keeps its row (removed_at) for the flags it marked.
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("entity", sa.String(ENTITY_LENGTH)),
    sa.Column("start_at", Timestamp, nullable=False),
    sa.Column("end_at", Timestamp, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("skip_training", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("author", sa.String(AUTHOR_LENGTH), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("removed_at", Timestamp),
    sa.CheckConstraint(sa.column("end_at") > sa.column("start_at"), name="span"),
    sa.Index("ix_am_suppressions_monitor_end_at", "monitor", "end_at"),
)

entity_states = sa.Table(
    "am_entity_states", metadata,
    # A window monitor's per-entity baseline, last samples and calibration under one
    # model version (anomaly_monitor.windows.EntityState bytes), written in the batch
    # transaction that consumed the samples.
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("entity", sa.String(ENTITY_LENGTH), primary_key=True),
    sa.Column("samples", sa.BigInteger, nullable=False),
    sa.Column("state", sa.LargeBinary, nullable=False),
    # The id of the last sample the state learned: rows at or below it are scored
    # without moving it (a cursor moved back, a version trained past the cursor).
    sa.Column("last_id", sa.BigInteger),
    sa.Column("updated_at", Timestamp, nullable=False),
)

trained_states = sa.Table(
    "am_trained_states", metadata,
    # The states of am_entity_states as training left them (never moved by scoring):
    # what ``anomaly-monitor backtest`` replays a window monitor's version from.
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("entity", sa.String(ENTITY_LENGTH), primary_key=True),
    sa.Column("samples", sa.BigInteger, nullable=False),
    sa.Column("state", sa.LargeBinary, nullable=False),
    sa.Column("last_id", sa.BigInteger),
)

activations = sa.Table(
    "am_activations", metadata,
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    # "activate" pushes the version on the monitor's history, "rollback" pops back to it.
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("at", Timestamp, nullable=False),
    sa.Index("ix_am_activations_monitor_id", "monitor", "id"),
)

quarantine = sa.Table(
    "am_quarantine", metadata,
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("source_id", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("raw_values", Json, nullable=False),
    sa.Column("quarantined_at", Timestamp, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("monitor", "generation", "source_id"),
)

batches = sa.Table(
    "am_batches", metadata,
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("first_id", sa.BigInteger, nullable=False),
    sa.Column("last_id", sa.BigInteger, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("flagged", sa.Integer, nullable=False),
    sa.Column("quarantined", sa.Integer, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("duration_seconds", sa.Float, nullable=False),
    sa.Column("newest_timestamp", Timestamp),
    # "window": rows read after the cursor; "late": rows found in an earlier window's
    # gaps; "backfill": rows at or below the cursor scored by ``anomaly-monitor backfill``.
    sa.Column("kind", sa.String(8), nullable=False, server_default="window"),
    # Id ranges [a, b] inside first_id..last_id that this batch did not score (fixed),
    # and those of them not yet found by the sweep (NULL once none is left or expired).
    sa.Column("gaps", NullableJson),
    sa.Column("open_gaps", NullableJson),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_am_batches_monitor_started_at", "monitor", "started_at"),
)

# What the batches of the active version drifted to from its training reference: the
# decayed bin counts (``anomaly_monitor.drift``) and the last report, written by each
# batch's transaction.
drift = sa.Table(
    "am_drift", metadata,
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("state", Json, nullable=False),
    sa.Column("drift_score", sa.Float, nullable=False),
    sa.Column("drifted_features", sa.Integer, nullable=False),
    sa.Column("score_drift", sa.Float, nullable=False),
    sa.Column("report", Json, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
)

# A challenger's (status ``shadow``) result on each batch the active version committed:
# written in that batch's transaction, never to am_anomalies.
shadow_batches = sa.Table(
    "am_shadow_batches", metadata,
    _row_id(),
    sa.Column("monitor", sa.String(MONITOR_NAME_LENGTH), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("active_version", sa.Integer, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("first_id", sa.BigInteger, nullable=False),
    sa.Column("last_id", sa.BigInteger, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("quarantined", sa.Integer, nullable=False),
    sa.Column("flagged", sa.Integer, nullable=False),
    sa.Column("active_flagged", sa.Integer, nullable=False),
    # Rows both flagged.
    sa.Column("overlap", sa.Integer, nullable=False),
    # Its flags the active version scored in its 5% tail (or flagged).
    sa.Column("agreed", sa.Integer, nullable=False),
    sa.Column("score_quantiles", Json, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("scored_at", Timestamp, nullable=False),
    sa.UniqueConstraint("monitor", "version", "generation", "last_id"),
)


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` as aware UTC (SQLite returns naive datetimes, stored as UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
