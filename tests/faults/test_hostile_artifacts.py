"""Hostile or corrupt model versions in am_model_versions are refused before anything is
executed, the active version stays, and concurrent activations never mix versions in a batch."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import threading
import time

import pytest
import sqlalchemy as sa
import torch
from prometheus_client import CollectorRegistry

from anomaly_monitor.batch import run_batch
from anomaly_monitor.lifecycle import activate_checked, train_monitor
from anomaly_monitor.metrics import Metrics
from anomaly_monitor.registry import ModelCache, RegistryError, active_version
from anomaly_monitor.source import reflect_source
from anomaly_monitor.tables import anomalies, batches, model_versions
from anomaly_monitor.worker import Worker
from tests.helpers import (
    Sensors,
    insert_rows,
    settings,
    trained_plant,
)

MAX_ACTIVATION_ROUNDS = 300  # rounds of 10 rows before the concurrent-activation test gives up


class Exploit:
    """Unpickling this creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def registry_db(engine):
    table, monitor, _, _ = trained_plant(engine)
    with engine.connect() as connection:
        original = connection.execute(sa.select(model_versions)).mappings().one()
    return engine, table, monitor, dict(original)


def forge(engine, original, version, *, artifact=None, manifest=None, sha=None, status="candidate"):
    """Store a copy of version 1 with parts replaced, hashes made consistent unless given."""
    row = {k: v for k, v in original.items() if k != "id"}
    row.update(version=version, status=status, activated_at=None)
    if artifact is not None:
        row["artifact"] = artifact
        digest = hashlib.sha256(artifact).hexdigest()
        row["artifact_sha256"] = digest
        row["manifest"] = {**row["manifest"], "weights_sha256": digest}
    if manifest is not None:
        row["manifest"] = manifest
    if sha is not None:
        row["artifact_sha256"] = sha
    with engine.begin() as connection:
        connection.execute(model_versions.insert().values(**row))


def pickle_payload(marker):
    return pickle.dumps(Exploit(marker))


def torch_payload(marker):
    buffer = io.BytesIO()
    torch.save({"weights": Exploit(marker)}, buffer)
    return buffer.getvalue()


def oversized_header(_marker):
    return struct.pack("<Q", 2**40) + b"{}"


def wrong_shapes(original):
    header = {"0.encoder.0.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + b"\x00" * 4


@pytest.mark.parametrize("make", [pickle_payload, torch_payload, oversized_header])
def test_hostile_payloads_are_refused_and_execute_nothing(registry_db, tmp_path, make):
    engine, _, monitor, original = registry_db
    marker = tmp_path / "pwned"
    forge(engine, original, 2, artifact=make(marker))
    with pytest.raises(RegistryError), engine.begin() as connection:
        activate_checked(connection, monitor, None, 2)
    assert not marker.exists()
    with engine.connect() as connection:
        assert active_version(connection, "plant") == 1


@pytest.mark.parametrize("tamper", ["flipped_byte", "wrong_shapes", "manifest_hash",
                                    "manifest_shapes"])
def test_corrupt_versions_are_refused(registry_db, tamper):
    engine, _, monitor, original = registry_db
    artifact = bytearray(original["artifact"])
    if tamper == "flipped_byte":
        artifact[len(artifact) // 2] ^= 0x01
        forge(engine, original, 2, artifact=None)
        with engine.begin() as connection:
            connection.execute(model_versions.update().where(model_versions.c.version == 2)
                               .values(artifact=bytes(artifact)))
    elif tamper == "wrong_shapes":
        forge(engine, original, 2, artifact=wrong_shapes(original))
    elif tamper == "manifest_hash":
        forge(engine, original, 2, sha="0" * 64)
    else:
        tensors = json.loads(json.dumps(original["manifest"]["tensors"]))
        first = next(iter(tensors))
        tensors[first]["shape"] = [1, 1]
        forge(engine, original, 2, manifest={**original["manifest"], "tensors": tensors})
    with pytest.raises(RegistryError), engine.begin() as connection:
        activate_checked(connection, monitor, None, 2)
    with engine.connect() as connection:
        assert active_version(connection, "plant") == 1


def test_a_tampered_active_version_pauses_the_monitor(registry_db, db_url, tmp_path):
    engine, table, monitor, original = registry_db
    marker = tmp_path / "pwned"
    with engine.begin() as connection:  # someone bypasses 'models activate' with plain SQL
        connection.execute(model_versions.update().values(status="retired"))
    forge(engine, original, 2, artifact=pickle_payload(marker), status="active")
    insert_rows(engine, table, Sensors().normal(3))
    worker = Worker(settings(db_url, monitor), engine, Metrics(CollectorRegistry()), device="cpu")
    assert worker.poll("plant").status == "paused"
    assert "version 2" in worker.states["plant"].detail
    assert not marker.exists()


def test_concurrent_activation_never_mixes_versions_within_a_batch(registry_db):
    engine, table, monitor, _ = registry_db
    train_monitor(engine, monitor, device="cpu", activate_version=False)
    sensors = Sensors(seed=4)
    stop = threading.Event()
    errors = []

    def flip():
        version = 1
        while not stop.is_set():
            version = 3 - version
            try:
                with engine.begin() as connection:
                    activate_checked(connection, monitor, None, version)
            except Exception as exc:
                errors.append(exc)

    flipper = threading.Thread(target=flip)
    flipper.start()
    with engine.connect() as connection:
        source = reflect_source(connection, monitor)
    models = ModelCache("cpu")

    def versions_used() -> set[int]:
        with engine.connect() as connection:
            return set(connection.execute(sa.select(batches.c.model_version)).scalars())

    # On SQLite the flipper's writes can lose the lock to the batches for a while: keep
    # going (bounded) until batches ran under both versions, however the threads interleave.
    try:
        for round_ in range(MAX_ACTIVATION_ROUNDS):
            insert_rows(engine, table, [*sensors.normal(8), *sensors.anomalous(2)])
            while not run_batch(engine, monitor, source, models).caught_up:
                pass
            if round_ >= 14 and versions_used() == {1, 2}:
                break
            time.sleep(0.01)  # let the flipper take the write lock between rounds
    finally:
        stop.set()
        flipper.join()
    with engine.connect() as connection:
        spans = connection.execute(sa.select(batches.c.first_id, batches.c.last_id,
                                             batches.c.model_version)).all()
        flagged = connection.execute(sa.select(anomalies.c.source_id,
                                               anomalies.c.model_version)).all()
    assert {s.model_version for s in spans} == {1, 2}
    for source_id, version in flagged:
        (span,) = [s for s in spans if s.first_id <= source_id <= s.last_id]
        assert span.model_version == version
    assert not [e for e in errors if not isinstance(e, sa.exc.OperationalError)]
