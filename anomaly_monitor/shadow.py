"""Challengers: a version in status ``shadow`` scores the batches the active version
commits, beside it, without writing a flag; its promotion gates judge what it did.

Each batch's shadow result (rows, its flags, the active version's flags, the rows
both flagged, its score quantiles) is a row of ``am_shadow_batches`` written in the
batch's own transaction, so it is counted exactly once like the batch. The gates
(:func:`evaluate_gates`) read their sums: the burn-in (``shadow_rows``), the flag
rate against the challenger's calibrated rate, the overlap of its flags with the
active version's, no more quarantine than its training window had, and its
validation loss against the active version's. ``promote = "auto"`` promotes a
challenger whose gates all pass, and rejects one still failing after
``REJECT_AFTER_BURN_INS`` burn-ins; ``models promote`` / ``models reject`` act by hand.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from anomaly_monitor.config import MonitorSettings, RetrainSettings
from anomaly_monitor.reading.values import Window
from anomaly_monitor.registry import LoadedModel, ModelVersion, RegistryError
from anomaly_monitor.scoring import StreamContext, flag_rows, score_rows
from anomaly_monitor.tables import model_versions, shadow_batches, utcnow

if TYPE_CHECKING:
    from anomaly_monitor.detectors.estimator import AutoencoderDetector

#: The challenger's flag share may be at most this many times its calibrated share (and
#: at least that share divided by it, when the burn-in should have seen 20 flags).
GATE_RATE_FACTOR = 3.0
#: Flags expected in the burn-in before the lower bound of the rate is judged.
GATE_RATE_MIN_EXPECTED = 20
#: At least this share of the challenger's flags are rows the active version also found
#: unusual, in its ``AGREEMENT_TAIL`` (it raises few alarms the active one calls normal;
#: the two versions' noise flags at the threshold itself rarely coincide), once it
#: flagged ...
GATE_MIN_OVERLAP = 0.5
#: The active version "also found the row unusual" when the row's tail probability under
#: its calibration is within this many times its calibrated flag share (5%: 5x 1%).
AGREEMENT_FACTOR = 5.0
#: Relative variances below this count as this (a constant feature's error is not divided
#: by zero).
VARIANCE_FLOOR = 1e-12
#: ... this many rows (fewer say little).
GATE_OVERLAP_MIN_FLAGS = 5
#: Quarantined rows in the shadow period may be at most this many times the share its
#: training window skipped, plus that many standard deviations of the count and a slack
#: share of the rows.
GATE_QUARANTINE_FACTOR = 2.0
GATE_QUARANTINE_SLACK = 0.001
GATE_QUARANTINE_SIGMAS = 3.0
#: The challenger's validation loss may be at most this much (relative) above the active's.
GATE_LOSS_MARGIN = 0.25
#: With ``promote = "auto"``, a challenger whose gates still fail after this many
#: burn-ins is rejected.
REJECT_AFTER_BURN_INS = 4
#: Score quantiles kept per shadow batch.
SHADOW_QUANTILES = ("0.5", "0.9", "0.99")


@dataclass(frozen=True)
class ShadowScore:
    """A challenger's result on one batch."""

    version: int
    rows: int
    flagged: int
    active_flagged: int
    #: Its flags the active version flagged too, and those in the active's ``AGREEMENT_TAIL``.
    overlap: int
    agreed: int
    quantiles: dict[str, float]
    seconds: float


def agreement_tail(calibrated_share: float) -> float:
    """The tail probability under the active version within which its rows count as
    unusual to it (``AGREEMENT_FACTOR`` times its ``calibrated_share``)."""
    return min(1.0, AGREEMENT_FACTOR * calibrated_share)


def active_tail(active: LoadedModel, scores: npt.NDArray[np.float64]
                ) -> npt.NDArray[np.float64]:
    """The tail probability of each of the active version's ``scores`` under its own
    calibration (a window monitor's score is already ``-log10`` of it)."""
    if active.window is not None:
        return np.power(10.0, -np.asarray(scores, dtype=np.float64))
    return active.severity.tail_probability(scores)


def score_shadow(challenger: LoadedModel, window: Window, stream: StreamContext | None,
                 active_flags: list[dict[str, Any]], active_tails: npt.NDArray[np.float64],
                 agreement_tail: float, scored_at: dt.datetime) -> ShadowScore:
    """Score ``window`` with the challenger (its ``stream`` states move, as the active
    version's do) and compare its flags with the active version's ``active_flags`` and
    with the rows whose tail probability under the active version (``active_tails``) is
    at most ``agreement_tail``."""
    t0 = time.perf_counter()
    scored = score_rows(challenger, window, stream)
    flags, _ = flag_rows(challenger.version.monitor, challenger, window, scored_at, stream,
                         scored)
    mine = {f["source_id"] for f in flags}
    theirs = {f["source_id"] for f in active_flags}
    unusual = set(window.ids[active_tails <= agreement_tail].tolist()) | theirs
    return ShadowScore(challenger.version.version, len(window.ids), len(mine), len(theirs),
                       len(mine & theirs), len(mine & unusual),
                       quantile_summary(scored.scores), time.perf_counter() - t0)


def shadow_writer(monitor: str, active: int, generation: int, window: Window,
                  shadow: ShadowScore, now: dt.datetime) -> Callable[[sa.Connection], None]:
    """The batch transaction's insert of the challenger's result."""
    ids = [*window.ids.tolist(), *(b.source_id for b in window.bad)]
    row = {"monitor": monitor, "version": shadow.version, "active_version": active,
           "generation": generation, "first_id": int(min(ids)), "last_id": int(max(ids)),
           "rows": shadow.rows, "quarantined": len(window.bad), "flagged": shadow.flagged,
           "active_flagged": shadow.active_flagged, "overlap": shadow.overlap,
           "agreed": shadow.agreed,
           "score_quantiles": shadow.quantiles, "seconds": shadow.seconds, "scored_at": now}

    def write(connection: sa.Connection) -> None:
        connection.execute(shadow_batches.insert().values(**row))

    return write


@dataclass(frozen=True)
class ShadowTotals:
    """The sums of a challenger's shadow batches."""

    rows: int = 0
    quarantined: int = 0
    flagged: int = 0
    active_flagged: int = 0
    overlap: int = 0
    agreed: int = 0
    #: Seconds the challenger spent scoring (its share of the batches' time).
    seconds: float = 0.0

    @property
    def flag_share(self) -> float | None:
        """The share of rows it flagged (``None`` before any)."""
        return self.flagged / self.rows if self.rows else None


def shadow_totals(connection: sa.Connection, monitor: str, version: int) -> ShadowTotals:
    """What ``version`` did in shadow so far."""
    t = shadow_batches.c
    row = connection.execute(
        sa.select(sa.func.sum(t.rows), sa.func.sum(t.quarantined), sa.func.sum(t.flagged),
                  sa.func.sum(t.active_flagged), sa.func.sum(t.overlap),
                  sa.func.sum(t.agreed), sa.func.sum(t.seconds))
        .where(t.monitor == monitor, t.version == version)).one()
    return ShadowTotals(*(int(v or 0) for v in row[:6]), float(row[6] or 0.0))


@dataclass(frozen=True)
class Gate:
    """One promotion gate: ``passed`` is ``None`` while it cannot be judged yet."""

    name: str
    passed: bool | None
    value: float | None
    limit: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (``models list --json``)."""
        return asdict(self)


#: The largest share of held-out rows left out of the held-out loss (its anomalies).
LOSS_TRIM = 0.05


def holdout_loss(detector: AutoencoderDetector, values: npt.NDArray[np.float64]) -> float:
    """The held-out loss of a detector on rows ``values``: the mean squared
    reconstruction error of each feature, in the rows' units, over the feature's
    variance in these rows, averaged over features; the worst ``LOSS_TRIM`` of rows
    left out. Two detectors trained on other windows compare on the same rows."""
    errors = detector.reconstruction_errors(values)
    variance = np.maximum(np.var(values, axis=0), VARIANCE_FLOOR)
    rows = np.sort((errors / variance).mean(axis=1))
    keep = max(1, len(rows) - int(LOSS_TRIM * len(rows)))
    return float(rows[:keep].mean())


def loss_gate(challenger: ModelVersion, active: ModelVersion | None) -> Gate:
    """The ``validation_loss`` gate: the challenger's held-out loss against the active
    version's on the same rows, as its training measured them. A window monitor's is not
    measured (passed: the other gates decide); one trained beside another version than
    the active one now cannot be judged (pending: a decision by hand)."""
    if challenger.training.get("window"):
        return Gate("validation_loss", True, None, "", "not measured for a window monitor")
    mine = challenger.validation.get("loss")
    theirs = challenger.validation.get("active_loss") or {}
    if mine is None or active is None or theirs.get("version") != active.version:
        return Gate("validation_loss", None, mine, "",
                    "not measured against the version active now (it was trained beside "
                    "another): promote or reject it by hand")
    limit = float(theirs["loss"]) * (1 + GATE_LOSS_MARGIN)
    return Gate("validation_loss", float(mine) <= limit, float(mine), f"<= {limit:.4g}",
                f"{float(mine):.4g} against the active version's {float(theirs['loss']):.4g} "
                "on the challenger's held-out rows")


def evaluate_gates(challenger: ModelVersion, active: ModelVersion | None,
                   totals: ShadowTotals, settings: RetrainSettings) -> list[Gate]:
    """The challenger's promotion gates after ``totals`` in shadow."""
    gates = [Gate("burn_in", totals.rows >= settings.shadow_rows, float(totals.rows),
                  f">= {settings.shadow_rows} rows",
                  f"{totals.rows} of {settings.shadow_rows} rows scored in shadow")]
    gates.append(_rate_gate(challenger, totals))
    if totals.flagged < GATE_OVERLAP_MIN_FLAGS:
        gates.append(Gate("overlap", True, None, f">= {GATE_MIN_OVERLAP:g}",
                          f"{totals.flagged} flag(s): fewer than {GATE_OVERLAP_MIN_FLAGS}, "
                          "not judged"))
    else:
        agreement = totals.agreed / totals.flagged
        gates.append(Gate("overlap", agreement >= GATE_MIN_OVERLAP, agreement,
                          f">= {GATE_MIN_OVERLAP:g}",
                          f"{totals.agreed} of its {totals.flagged} flags unusual to the "
                          f"active version too (flagged, or in {AGREEMENT_FACTOR:g}x its "
                          "calibrated tail); "
                          f"{totals.overlap} flagged by both, the active "
                          f"{totals.active_flagged}"))
    gates.append(_quarantine_gate(challenger, totals))
    gates.append(loss_gate(challenger, active))
    return gates


def _quarantine_gate(challenger: ModelVersion, totals: ShadowTotals) -> Gate:
    """``quarantine``: no more rows quarantined in shadow than ``GATE_QUARANTINE_FACTOR``
    times what its training window's skipped share predicts, plus the sampling noise of
    so few rows (``GATE_QUARANTINE_SIGMAS`` standard deviations) and the slack."""
    consumed = totals.rows + totals.quarantined
    trained = challenger.training.get("rows", 0) + challenger.training.get("holdout_rows", 0)
    skipped = challenger.training.get("skipped_rows", 0)
    share = (skipped + 1) / (trained + skipped + 2)  # one pseudo-count each way
    expected = share * consumed
    allowed = GATE_QUARANTINE_FACTOR * expected + GATE_QUARANTINE_SIGMAS * math.sqrt(
        expected) + GATE_QUARANTINE_SLACK * consumed
    return Gate("quarantine", totals.quarantined <= allowed,
                totals.quarantined / consumed if consumed else 0.0, f"<= {allowed:.1f} rows",
                f"{totals.quarantined} of {consumed} rows quarantined in shadow; its training "
                f"window skipped {skipped} of {trained + skipped}")


def _rate_gate(challenger: ModelVersion, totals: ShadowTotals) -> Gate:
    """``flag_rate``: at most ``GATE_RATE_FACTOR`` times the monitor's target rate (or no
    more than the active version flagged on the same rows: after a shift it flags them
    all), and at least its own calibrated share over that factor (judged once
    ``GATE_RATE_MIN_EXPECTED`` flags were expected: far fewer means it is broken)."""
    share = totals.flag_share
    if share is None:
        return Gate("flag_rate", None, None, "", "no row scored in shadow yet")
    calibrated = challenger.expected_ratio()
    target = float(challenger.threshold_params.get("target_fpr") or calibrated)
    slack = 1.0 / max(totals.rows, 1)
    high = share <= GATE_RATE_FACTOR * target + slack or totals.flagged <= totals.active_flagged
    low = calibrated * totals.rows < GATE_RATE_MIN_EXPECTED or \
        share >= calibrated / GATE_RATE_FACTOR
    return Gate("flag_rate", high and low, share,
                f"<= {GATE_RATE_FACTOR:g} x target {target:.4g} (or the active version's), "
                f">= its calibrated {calibrated:.4g} / {GATE_RATE_FACTOR:g}",
                f"flagged {totals.flagged} of {totals.rows} rows ({share:.4g}); the active "
                f"version {totals.active_flagged}")


def gates_pass(gates: list[Gate]) -> bool:
    """Whether every gate passed."""
    return all(g.passed is True for g in gates)


def shadow_version(connection: sa.Connection, monitor: str) -> int | None:
    """The monitor's challenger, ``None`` when there is none."""
    return connection.execute(
        sa.select(model_versions.c.version).where(
            model_versions.c.monitor == monitor, model_versions.c.status == "shadow")
    ).scalar()


def decide(connection: sa.Connection, monitor: str, version: int, status: str,
           decision: dict[str, Any]) -> None:
    """Record a challenger's end: ``status`` (``shadow`` keeps it, for a promotion that
    activates it next in the same transaction) and the decision in
    ``validation["decision"]``. The status changes only while the version is still in
    shadow, in one statement that locks its row (a reject racing a promotion or a newer
    challenger finds it gone: :class:`RegistryError`)."""
    where = (model_versions.c.monitor == monitor, model_versions.c.version == version)
    changed = connection.execute(model_versions.update().where(
        *where, model_versions.c.status == "shadow").values(status=status)).rowcount
    if changed != 1:
        raise RegistryError(f"monitor {monitor!r} version {version} is not a challenger in "
                            "shadow (models list shows the statuses)")
    current = connection.execute(sa.select(model_versions.c.validation).where(*where)).scalar()
    connection.execute(model_versions.update().where(*where).values(
        validation={**(current or {}), "decision": decision}))


def reject(connection: sa.Connection, monitor: str, version: int, *, by: str,
           reason: str) -> None:
    """Turn a challenger down: it stops scoring in shadow."""
    decide(connection, monitor, version, "rejected",
           {"action": "rejected", "by": by, "reason": reason, "at": utcnow().isoformat()})


def record_promotion(connection: sa.Connection, monitor: MonitorSettings, version: int,
                     *, by: str, gates: list[Gate]) -> None:
    """Note who promoted a challenger and its gates then, in ``validation["decision"]``,
    while it is still in shadow (:class:`RegistryError` otherwise); the caller activates
    it in the same transaction (:func:`anomaly_monitor.lifecycle.activate_checked`)."""
    decide(connection, monitor.name, version, "shadow", {
        "action": "promoted", "by": by, "at": utcnow().isoformat(),
        "gates": [g.to_dict() for g in gates]})


def quantile_summary(values: npt.NDArray[np.float64]) -> dict[str, float]:
    """Score quantiles as the shadow batches keep them."""
    return {q: float(np.quantile(values, float(q))) for q in SHADOW_QUANTILES} \
        if values.size else {}
