"""Model versions in ``am_model_versions``: store, verify, load, activate, roll back.

A version holds the detector as safetensors bytes plus its JSON manifest, the
sha256 of the bytes, the threshold and how it was set, the severity scale and
the held-out calibration scores. At most one version per monitor is active (a
partial unique index enforces it); activating verifies the artifact first, so a
tampered version can never become active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.calibration import SeverityScale, Threshold
from anomaly_monitor.cursors import create_cursor
from anomaly_monitor.tables import activations, as_utc, model_versions, utcnow
from anomaly_monitor.windows import WindowSpec

if TYPE_CHECKING:
    from anomaly_monitor.detectors.estimator import AutoencoderDetector

#: At most this many held-out scores are stored with a version (evenly spaced quantiles).
MAX_CALIBRATION_SCORES = 100_000
_SUMMARY_COLUMNS = [c for c in model_versions.c
                    if c.name not in ("artifact", "manifest", "calibration_scores")]


class RegistryError(ValueError):
    """A version does not exist, cannot be activated, or its artifact is invalid."""


class UnknownVersionError(RegistryError):
    """The version asked for does not exist (the caller's input to fix)."""


@dataclass(frozen=True)
class ModelVersion:
    """A stored version's metadata (without its weights)."""

    monitor: str
    version: int
    kind: str
    status: str
    features: list[str]
    hyperparameters: dict[str, Any]
    artifact_sha256: str
    threshold: float
    threshold_method: str
    threshold_params: dict[str, Any]
    severity_scale: dict[str, Any]
    training: dict[str, Any]
    validation: dict[str, Any]
    created_at: dt.datetime
    activated_at: dt.datetime | None
    #: When retention (``keep_versions``) removed the artifact; ``None`` while kept.
    pruned_at: dt.datetime | None = None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> ModelVersion:
        """Build from a row of ``am_model_versions``."""
        data = {name: getattr(row, name) for name in cls.__dataclass_fields__}
        data["created_at"] = as_utc(data["created_at"])
        data["activated_at"] = as_utc(data["activated_at"])
        data["pruned_at"] = as_utc(data["pruned_at"])
        return cls(**data)

    def expected_ratio(self, scale: SeverityScale | None = None) -> float:
        """The share of rows the threshold flags under the version's held-out
        calibration scores (the anomaly rate a healthy source should show); ``scale``:
        its severity scale when already built (a loaded model's)."""
        scale = scale or SeverityScale.from_dict(self.severity_scale)
        return float(scale.tail_probability([self.threshold])[0])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (times as ISO 8601)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for key in ("created_at", "activated_at", "pruned_at"):
            data[key] = data[key].isoformat() if data[key] is not None else None
        return data


@dataclass
class LoadedModel:
    """An active version ready to score."""

    version: ModelVersion
    detector: AutoencoderDetector
    severity: SeverityScale
    #: A window monitor's version: how rows become inputs and scores.
    window: WindowSpec | None = None

    def expected_ratio(self) -> float:
        """:meth:`ModelVersion.expected_ratio` from the scale already loaded (per batch)."""
        return self.version.expected_ratio(self.severity)


def pack_scores(scores: npt.ArrayLike) -> bytes:
    """Sorted float32 bytes of at most ``MAX_CALIBRATION_SCORES`` scores."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if values.size > MAX_CALIBRATION_SCORES:
        values = np.quantile(values, np.linspace(0, 1, MAX_CALIBRATION_SCORES))
    return values.astype("<f4").tobytes()


def unpack_scores(data: bytes) -> npt.NDArray[np.float64]:
    """The inverse of :func:`pack_scores`."""
    return np.frombuffer(data, dtype="<f4").astype(np.float64)


def store_version(
    connection: sa.Connection,
    monitor: str,
    detector: AutoencoderDetector,
    threshold: Threshold,
    calibration_scores: npt.ArrayLike,
    *,
    training: dict[str, Any],
    validation: dict[str, Any],
    features: list[str] | None = None,
    status: str = "candidate",
) -> ModelVersion:
    """Insert a new version (number = previous + 1) in ``status`` (``candidate``, or
    ``shadow`` for a challenger) and return it.
    ``features`` are the source columns it reads (default: the detector's inputs; a
    window monitor's detector reads inputs built from them, ``training["window"]``)."""
    from anomaly_monitor.detectors.artifact import dump_detector

    manifest, weights = dump_detector(detector)
    latest = connection.execute(
        sa.select(sa.func.max(model_versions.c.version)).where(model_versions.c.monitor == monitor)
    ).scalar()
    version = int(latest or 0) + 1
    connection.execute(model_versions.insert().values(
        monitor=monitor, version=version, kind=detector.kind, status=status,
        features=features if features is not None else list(detector.feature_names_in_ or []),
        hyperparameters=manifest["hyperparameters"], manifest=manifest, artifact=weights,
        artifact_sha256=manifest["weights_sha256"], threshold=float(threshold.value),
        threshold_method=threshold.method, threshold_params=_threshold_params(threshold),
        severity_scale=SeverityScale.fit(calibration_scores).to_dict(),
        calibration_scores=pack_scores(calibration_scores),
        training=training, validation=validation, created_at=utcnow(),
    ))
    return get_version(connection, monitor, version)


def _threshold_params(threshold: Threshold) -> dict[str, Any]:
    return {**threshold.params, "calibration_flag_rate": threshold.calibration_flag_rate}


def list_versions(connection: sa.Connection, monitor: str) -> list[ModelVersion]:
    """Every version of ``monitor``, newest first."""
    rows = connection.execute(
        sa.select(*_SUMMARY_COLUMNS).where(model_versions.c.monitor == monitor)
        .order_by(model_versions.c.version.desc())
    ).all()
    return [ModelVersion.from_row(r) for r in rows]


def get_version(connection: sa.Connection, monitor: str, version: int) -> ModelVersion:
    """One version; :class:`RegistryError` when it does not exist."""
    row = connection.execute(
        sa.select(*_SUMMARY_COLUMNS).where(
            model_versions.c.monitor == monitor, model_versions.c.version == version)
    ).first()
    if row is None:
        raise UnknownVersionError(f"monitor {monitor!r} has no model version {version}")
    return ModelVersion.from_row(row)


def active_version(connection: sa.Connection, monitor: str) -> int | None:
    """The number of the active version, ``None`` when no version is active."""
    return connection.execute(
        sa.select(model_versions.c.version).where(
            model_versions.c.monitor == monitor, model_versions.c.status == "active")
    ).scalar()


def calibration_scores(
    connection: sa.Connection, monitor: str, version: int
) -> npt.NDArray[np.float64]:
    """The held-out calibration scores stored with a version."""
    data = connection.execute(
        sa.select(model_versions.c.calibration_scores).where(
            model_versions.c.monitor == monitor, model_versions.c.version == version)
    ).scalar()
    if data is None:
        raise UnknownVersionError(f"monitor {monitor!r} has no model version {version}")
    return unpack_scores(data)


def load_model(
    connection: sa.Connection, monitor: str, version: int, *, device: str = "auto"
) -> LoadedModel:
    """Load and verify a version's detector (hash, header, shapes; nothing unpickled)."""
    from anomaly_monitor.detectors.artifact import ArtifactError, restore_detector
    from anomaly_monitor.detectors.estimator import AutoencoderDetector

    meta = get_version(connection, monitor, version)
    manifest, weights = connection.execute(
        sa.select(model_versions.c.manifest, model_versions.c.artifact).where(
            model_versions.c.monitor == monitor, model_versions.c.version == version)
    ).one()
    if weights is None:
        raise RegistryError(
            f"monitor {monitor!r} version {version}: its artifact was removed by retention "
            f"on {meta.pruned_at:%Y-%m-%d %H:%M}Z (keep_versions); train a new version")
    try:
        if not isinstance(manifest, dict) or manifest.get("weights_sha256") != meta.artifact_sha256:
            raise ArtifactError("the manifest's sha256 differs from the version's recorded sha256")
        detector = restore_detector(AutoencoderDetector, manifest, bytes(weights), device=device)
        severity = SeverityScale.from_dict(meta.severity_scale)
        window = (WindowSpec.from_dict(meta.training["window"])
                  if meta.training.get("window") else None)
    except (ArtifactError, KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"monitor {monitor!r} version {version}: {exc}") from None
    inputs = list(meta.features) if window is None else window.input_names()
    if list(detector.feature_names_in_ or []) != inputs or \
            (window is not None and list(window.features) != list(meta.features)):
        raise RegistryError(
            f"monitor {monitor!r} version {version}: the artifact's features differ from the "
            "version's recorded features"
        )
    return LoadedModel(meta, detector, severity, window)


def activate(
    connection: sa.Connection,
    monitor: str,
    version: int,
    *,
    initial_position: Callable[[], int],
    verify: Callable[[LoadedModel], None] | None = None,
    action: str = "activate",
) -> ModelVersion:
    """Make ``version`` the active one after verifying its artifact.

    The previous active version is retired. The first activation of a monitor
    creates its cursor at ``initial_position()`` (the newest source row), so that
    older rows count as training data and are not scored. ``verify`` may reject
    the loaded model (for example when the source lacks one of its features).
    """
    loaded = load_model(connection, monitor, version, device="cpu")
    if verify is not None:
        verify(loaded)
    now = utcnow()
    connection.execute(
        model_versions.update().where(
            model_versions.c.monitor == monitor, model_versions.c.status == "active",
            model_versions.c.version != version)
        .values(status="retired")
    )
    connection.execute(
        model_versions.update().where(
            model_versions.c.monitor == monitor, model_versions.c.version == version)
        .values(status="active", activated_at=now)
    )
    create_cursor(connection, monitor, initial_position, now)
    connection.execute(activations.insert().values(monitor=monitor, version=version,
                                                   action=action, at=now))
    return get_version(connection, monitor, version)


def activation_history(connection: sa.Connection, monitor: str) -> list[tuple[int, str, Any]]:
    """The monitor's activations, oldest first: (version, action, when)."""
    rows = connection.execute(
        sa.select(activations.c.version, activations.c.action, activations.c.at)
        .where(activations.c.monitor == monitor).order_by(activations.c.id)).all()
    return [(int(r.version), r.action, as_utc(r.at)) for r in rows]


def _stack(history: list[tuple[int, str, Any]]) -> list[int]:
    """Replay the history: an activation pushes its version (unless it is already on
    top), a rollback pops the top."""
    stack: list[int] = []
    for version, action, _ in history:
        if action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
        elif not stack or stack[-1] != version:
            stack.append(version)
    return stack


def rollback_target(connection: sa.Connection, monitor: str) -> int:
    """The version to roll back to: the one active before the current one in the
    activation history (after ``activate 1``, ``activate 3``: version 1). Rolling back
    again steps further back along the history."""
    current = active_version(connection, monitor)
    if current is None:
        raise RegistryError(f"monitor {monitor!r} has no active version to roll back from")
    stack = _stack(activation_history(connection, monitor))
    if stack and stack[-1] != current:  # activated outside this history: it is the top
        stack.append(current)
    if len(stack) < 2:
        raise RegistryError(
            f"monitor {monitor!r}: no version was active before version {current}; "
            "nothing to roll back to"
        )
    return stack[-2]


def set_threshold(
    connection: sa.Connection, monitor: str, version: int, threshold: Threshold, *,
    replacing: float | None = None, status: str | None = None,
) -> None:
    """Store a new threshold for a version (takes effect on the next batch). With
    ``replacing`` (the threshold it was calibrated from) and ``status``, only if the
    version still has them, in the same statement; otherwise :class:`RegistryError`."""
    conditions = [model_versions.c.monitor == monitor, model_versions.c.version == version]
    if replacing is not None:
        conditions.append(model_versions.c.threshold == replacing)
    if status is not None:
        conditions.append(model_versions.c.status == status)
    result = connection.execute(
        model_versions.update().where(*conditions)
        .values(threshold=float(threshold.value), threshold_method=threshold.method,
                threshold_params=_threshold_params(threshold))
    )
    if result.rowcount == 1:
        return
    if len(conditions) == 2:
        raise UnknownVersionError(f"monitor {monitor!r} has no model version {version}")
    raise RegistryError(
        f"monitor {monitor!r} version {version}: its threshold or status changed during "
        "calibration (another calibrate, activate or rollback); run calibrate again")


class ModelCache:
    """The active version of each monitor and its loaded model. The version (and its
    threshold) is re-read every batch, so activation and calibration need no restart;
    the model is loaded only when there are rows to score, so an idle start is fast."""

    def __init__(self, device: str = "auto", *, threads: int | None = None) -> None:
        self.device = device
        #: torch's CPU threads, set when the first model is loaded (``None``: as is).
        self.threads = threads
        self._versions: dict[str, ModelVersion] = {}
        self._models: dict[str, LoadedModel] = {}
        self._shadows: dict[str, LoadedModel] = {}
        #: A challenger that failed to load, and why: (version, message).
        self._shadow_errors: dict[str, tuple[int, str]] = {}

    def active_version(self, connection: sa.Connection, monitor: str) -> ModelVersion | None:
        """The active version's metadata, ``None`` when no version is active."""
        row = connection.execute(
            sa.select(model_versions.c.version, model_versions.c.threshold,
                      model_versions.c.threshold_method)
            .where(model_versions.c.monitor == monitor, model_versions.c.status == "active")
        ).first()
        if row is None:
            self._versions.pop(monitor, None)
            return None
        meta = self._versions.get(monitor)
        if meta is None or meta.version != row.version:
            meta = get_version(connection, monitor, row.version)
        elif meta.threshold != row.threshold:
            meta = dataclasses.replace(meta, threshold=float(row.threshold),
                                       threshold_method=row.threshold_method)
        self._versions[monitor] = meta
        return meta

    def model(self, connection: sa.Connection, version: ModelVersion) -> LoadedModel:
        """The loaded (and verified) model of ``version``, cached."""
        return self._cached(connection, self._models, version)

    def _cached(self, connection: sa.Connection, cache: dict[str, LoadedModel],
                version: ModelVersion) -> LoadedModel:
        """``version`` loaded, from ``cache`` when its weights are there already."""
        loaded = cache.get(version.monitor)
        if loaded is None or loaded.version.version != version.version:
            if self.threads is not None:
                import torch  # loaded with the model anyway

                torch.set_num_threads(self.threads)
            loaded = load_model(connection, version.monitor, version.version, device=self.device)
        if loaded.version != version:  # a new threshold on the same weights
            loaded = LoadedModel(version, loaded.detector, loaded.severity, loaded.window)
        cache[version.monitor] = loaded
        return loaded

    def shadow(self, connection: sa.Connection, monitor: str) -> LoadedModel | None:
        """The monitor's challenger (status ``shadow``), loaded and cached; ``None``
        when there is none."""
        row = connection.execute(
            sa.select(model_versions.c.version, model_versions.c.threshold).where(
                model_versions.c.monitor == monitor, model_versions.c.status == "shadow")
        ).first()
        if row is None:
            self._shadows.pop(monitor, None)
            return None
        failed = self._shadow_errors.get(monitor)
        if failed is not None and failed[0] == row.version:  # not loaded again every batch
            raise RegistryError(failed[1])
        loaded = self._shadows.get(monitor)
        meta = loaded.version if loaded is not None and \
            (loaded.version.version, loaded.version.threshold) == (row.version, row.threshold) \
            else get_version(connection, monitor, row.version)
        try:
            return self._cached(connection, self._shadows, meta)
        except RegistryError as exc:
            self._shadow_errors[monitor] = (int(row.version), str(exc))
            raise

    def oom_counts(self, monitor: str) -> dict[str, int]:
        """CUDA out-of-memory events the monitor's loaded detectors (active and
        challenger) handled, by action, since they were loaded."""
        total: dict[str, int] = {}
        for loaded in (self._models.get(monitor), self._shadows.get(monitor)):
            if loaded is not None:
                for action, count in loaded.detector.oom_counts().as_dict().items():
                    total[action] = total.get(action, 0) + count
        return total

    def active(self, connection: sa.Connection, monitor: str) -> LoadedModel | None:
        """The active model of ``monitor``, loaded; ``None`` when no version is active."""
        version = self.active_version(connection, monitor)
        return None if version is None else self.model(connection, version)


def prune_artifacts(connection: sa.Connection, monitor: str, keep: int) -> list[int]:
    """Remove the artifacts of the versions older than the newest ``keep`` (never the
    active one, a challenger, or the version a rollback returns to); their metadata,
    threshold and calibration scores stay. The versions pruned, oldest first."""
    rows = connection.execute(
        sa.select(model_versions.c.version, model_versions.c.status)
        .where(model_versions.c.monitor == monitor, model_versions.c.artifact.is_not(None))
        .order_by(model_versions.c.version.desc())).all()
    protected = {r.version for r in rows if r.status in ("active", "shadow")}
    with contextlib.suppress(RegistryError):  # nothing to roll back to
        protected.add(rollback_target(connection, monitor))
    newest = {r.version for r in rows[:keep]}
    doomed = sorted(r.version for r in rows if r.version not in newest | protected)
    if doomed:  # the status re-checked in the statement: one activated meanwhile stays
        result = connection.execute(model_versions.update().where(
            model_versions.c.monitor == monitor, model_versions.c.version.in_(doomed),
            model_versions.c.status.not_in(("active", "shadow")))
            .values(artifact=None, pruned_at=utcnow())
            .returning(model_versions.c.version))
        doomed = sorted(int(v) for v in result.scalars())
    return doomed
