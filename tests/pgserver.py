"""A throwaway PostgreSQL server for the test suite, started from the installed binaries.

PostgreSQL refuses to run as root, so when the tests run as root the data
directory is handed to the ``postgres`` user and every server command runs
through ``runuser``. The server listens on 127.0.0.1 and a free port only.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

SUPERUSER = "postgres"
TEMPLATE = "am_template"
START_TIMEOUT_SECONDS = 60


def find_bin(name: str) -> str | None:
    """The path of a PostgreSQL binary on PATH or in Debian's versioned directories."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server; ``url(db)`` gives a SQLAlchemy URL for a database on it."""

    datadir: Path
    port: int
    run_as: str | None
    pg_ctl: str

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return [*prefix, *args]

    def url(self, database: str, user: str = SUPERUSER, password: str | None = None) -> str:
        """SQLAlchemy URL (psycopg 3) of ``database``."""
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        """An autocommit psycopg connection as the superuser."""
        return psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER,
                               dbname=database, autocommit=True)

    def create_database(self, template: str | None = TEMPLATE) -> str:
        """A new database (a copy of ``template``); returns its name."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            clause = f" TEMPLATE {template}" if template else ""
            conn.execute(f"CREATE DATABASE {name}{clause}")
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing its connections."""
        with self.connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server."""
        subprocess.run(self._cmd(self.pg_ctl, "-D", str(self.datadir), "-m", mode, "-w", "stop"),
                       check=False, capture_output=True, timeout=START_TIMEOUT_SECONDS)

    def start(self) -> None:
        """(Re)start the server on its port."""
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.datadir} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(
            self._cmd(self.pg_ctl, "-D", str(self.datadir), "-l", str(self.datadir / "log"),
                      "-o", options, "-w", "-t", str(START_TIMEOUT_SECONDS), "start"),
            check=True, capture_output=True, timeout=START_TIMEOUT_SECONDS + 10,
        )


def start_server() -> PostgresServer:
    """initdb a fresh cluster in a temporary directory and start it."""
    initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise FileNotFoundError("initdb/pg_ctl not found (install postgresql)")
    run_as = SUPERUSER if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="am-pg-"))
    datadir = root / "data"
    datadir.mkdir()
    if run_as:
        shutil.chown(root, run_as)
        shutil.chown(datadir, run_as)
        root.chmod(0o755)
    prefix = ["runuser", "-u", run_as, "--"] if run_as else []
    subprocess.run([*prefix, initdb, "-D", str(datadir), "-U", SUPERUSER, "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
    server = PostgresServer(datadir, free_port(), run_as, pg_ctl)
    server.start()
    return server


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A started server, stopped and removed afterwards."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.datadir.parent, ignore_errors=True)
