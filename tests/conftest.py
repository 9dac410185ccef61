"""Shared fixtures: seeded synthetic data whose anomalies break feature correlations."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly_monitor import migrate
from anomaly_monitor.db import create_engine


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    # Two cores on CI: keep torch from oversubscribing them.
    torch.set_num_threads(2)


def correlated_data(
    n_normal: int = 2000, n_anomalies: int = 100, n_features: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal rows on a 2-D linear manifold plus noise, and anomalies with the
    same per-feature distributions but the correlations broken (each feature
    drawn from a different normal row)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(2, n_features))

    def normal(n: int) -> np.ndarray:
        return rng.normal(size=(n, 2)) @ mixing + 0.1 * rng.normal(size=(n, n_features))

    train = normal(n_normal)
    test_normal = normal(n_anomalies * 4)
    pool = normal(n_anomalies * n_features)
    anomalies = np.stack(
        [pool[rng.integers(0, len(pool), n_anomalies), j] for j in range(n_features)], axis=1
    )
    x_test = np.vstack([test_normal, anomalies])
    y_test = np.r_[np.zeros(len(test_normal)), np.ones(n_anomalies)]
    return train, x_test, y_test


@pytest.fixture(scope="session")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return correlated_data()


# -- databases: a SQLite file and a real PostgreSQL started by the suite ----------------------

@pytest.fixture(scope="session")
def pg_server():
    from tests.pgserver import TEMPLATE, find_bin, running_server

    if find_bin("initdb") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries are missing but CI=true: the tests must run")
        pytest.skip("PostgreSQL is not installed (initdb not found)")
    with running_server() as server:
        with server.connect() as connection:
            connection.execute(f"CREATE DATABASE {TEMPLATE}")
        template = create_engine(server.url(TEMPLATE))
        migrate.upgrade(template)
        template.dispose()
        yield server


def _database_url(request: pytest.FixtureRequest, tmp_path: Path, *, migrated: bool):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'monitor.db'}"
        if migrated:
            engine = create_engine(url)
            migrate.upgrade(engine)
            engine.dispose()
        yield url
        return
    server = request.getfixturevalue("pg_server")
    name = server.create_database(template=None if not migrated else "am_template")
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A migrated database: a SQLite file, then a fresh PostgreSQL database."""
    yield from _database_url(request, tmp_path, migrated=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def bare_db_url(request, tmp_path):
    """A database without the am_ tables."""
    yield from _database_url(request, tmp_path, migrated=False)


@pytest.fixture
def engine(db_url):
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_server):
    """A migrated PostgreSQL database (for behaviour only PostgreSQL has)."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)
