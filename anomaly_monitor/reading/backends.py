"""Where an :class:`~anomaly_monitor.reading.arrow.ArrowReader` runs its ADBC queries.

* PostgreSQL: an ADBC connection in this process, queried on one worker thread so
  that the next window can be read while the current one is scored.
* SQLite: an ADBC connection in a child process (``python -m
  anomaly_monitor.reading.backends FILE``) that sends each result back as an Arrow IPC
  stream. The ADBC driver links its own copy of SQLite; two copies of SQLite in one
  process drop each other's POSIX locks on the database file (closing either one's
  file descriptor releases both), which lets one delete the WAL under the other
  (https://www.sqlite.org/howtocorrupt.html, section 2.2.1). In a child process the
  locks work as between any two processes, and the read runs on the other core.

Frames on the child's pipes: a request is an 8-byte big-endian length and a JSON
object ``{"sql": ..., "batch_rows": ...}``; a reply is one byte (``T`` a table, ``E``
an error), an 8-byte length and the payload (an Arrow IPC stream, or UTF-8 text).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

if TYPE_CHECKING:
    import pyarrow as pa

#: A reply from the SQLite reader process must start within its busy timeout plus this
#: many seconds; else the process is killed and the read fails.
CHILD_REPLY_MARGIN_SECONDS = 30.0
#: The reader process is given this long to exit after its input is closed.
CHILD_EXIT_SECONDS = 5.0
LENGTH_BYTES = 8
#: The reader process checks this often whether its parent is still alive.
PARENT_CHECK_SECONDS = 1.0


class BackendError(RuntimeError):
    """The query failed, or the backend is broken (the reader then stands aside)."""


class Pending(Protocol):
    """A submitted query."""

    def result(self) -> pa.Table:
        """Wait for the query's table (raises on failure)."""
        ...


class Backend(Protocol):
    """Runs one query at a time; a new query is submitted only after the last one's
    result was taken."""

    def submit(self, sql: str, batch_rows: int) -> Pending:
        """Start ``sql``."""
        ...

    def close(self) -> None:
        """Release the connection (waits for a running query)."""
        ...

    def cancel(self) -> None:
        """Cancel the running query, if any (from another thread); its result raises."""
        ...


def _run(connection: Any, sql: str, batch_rows: int | None) -> pa.Table:
    # The driver manager's own API: its DB-API layer would import pandas (a second).
    import adbc_driver_manager
    import pyarrow as pa

    statement = adbc_driver_manager.AdbcStatement(connection)
    try:
        if batch_rows is not None:
            # The SQLite driver types each column from its first batch of rows; one
            # batch for the whole result lets it see every value first.
            statement.set_options(
                **{"adbc.sqlite.query.batch_rows": str(max(batch_rows, 1024))})
        statement.set_sql_query(sql)
        stream, _ = statement.execute_query()
        return pa.RecordBatchReader.from_stream(stream).read_all()
    finally:
        statement.close()


class Connection:
    """An ADBC database handle and one autocommit connection to it (an open read
    transaction would pin an old snapshot)."""

    def __init__(self, database: Any) -> None:
        import adbc_driver_manager

        self.database = database
        self.connection = adbc_driver_manager.AdbcConnection(database)
        self.connection.set_autocommit(True)

    def query(self, sql: str, batch_rows: int | None = None) -> pa.Table:
        """The result of ``sql``."""
        return _run(self.connection, sql, batch_rows)

    def close(self) -> None:
        """Close the connection and the database handle."""
        try:
            self.connection.close()
        finally:
            self.database.close()


def connect_postgresql(conninfo: str) -> Connection:
    """An ADBC connection to PostgreSQL."""
    import adbc_driver_postgresql

    return Connection(adbc_driver_postgresql.connect(conninfo))


def connect_sqlite(path: str, busy_timeout_ms: int) -> Connection:
    """An ADBC connection to the SQLite file ``path`` (only in a process that does
    not also open it through Python's sqlite3: see the module docstring)."""
    import adbc_driver_sqlite

    connection = Connection(adbc_driver_sqlite.connect(path))
    connection.query(f"PRAGMA busy_timeout = {int(busy_timeout_ms):d}")
    return connection


class ThreadBackend:
    """An ADBC PostgreSQL connection in this process, used from one worker thread."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._connection: Connection | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="arrow-read")

    def _query(self, sql: str) -> pa.Table:
        if self._connection is None:
            self._connection = connect_postgresql(self._conninfo)
        try:
            return self._connection.query(sql)
        except Exception:
            self._drop()  # a failed connection is not reused
            raise

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a broken one may refuse to close
                connection.close()

    def submit(self, sql: str, batch_rows: int) -> Pending:
        return self._pool.submit(self._query, sql)

    def cancel(self) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):  # nothing running, or already closed
                connection.connection.cancel()

    def close(self) -> None:
        self._pool.submit(self._drop).result()
        self._pool.shutdown(wait=True)


def _read_exactly(stream: BinaryIO, size: int, timeout: float | None) -> bytearray:
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size:
        if timeout is not None:
            ready, _, _ = select.select([stream], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no reply within {timeout:.0f} s")
        count = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not count:
            raise EOFError("the stream ended")
        got += count
    return data


class _ChildReply:
    def __init__(self, backend: ChildBackend) -> None:
        self.backend = backend

    def result(self) -> pa.Table:
        return self.backend.receive()


class ChildBackend:
    """ADBC SQLite in a child process; see the module docstring."""

    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._process: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is not None:
            self.close()  # reap the dead one and close its pipes
        if self._process is None:
            self._process = subprocess.Popen(  # noqa: S603 (our own module, no shell)
                [sys.executable, "-m", "anomaly_monitor.reading.backends", self._path,
                 str(self._busy_timeout_ms), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
        return self._process

    def submit(self, sql: str, batch_rows: int) -> Pending:
        process = self._start()
        assert process.stdin is not None
        request = json.dumps({"sql": sql, "batch_rows": batch_rows}).encode()
        try:
            process.stdin.write(len(request).to_bytes(LENGTH_BYTES, "big") + request)
        except OSError as exc:
            self.close()
            raise BackendError(f"the SQLite reader process is gone: {exc}") from None
        return _ChildReply(self)

    def receive(self) -> pa.Table:
        """The reply to the last request."""
        import pyarrow as pa

        process = self._process
        if process is None or process.stdout is None:
            raise BackendError("the SQLite reader process is not running")
        try:
            header = _read_exactly(process.stdout, 1 + LENGTH_BYTES,
                                   self._busy_timeout_ms / 1000 + CHILD_REPLY_MARGIN_SECONDS)
            payload = _read_exactly(process.stdout, int.from_bytes(header[1:], "big"), None)
        except (OSError, EOFError, TimeoutError) as exc:
            self.close()
            raise BackendError(f"the SQLite reader process failed: {exc}") from None
        if header[:1] == b"E":
            raise BackendError(payload.decode(errors="replace"))
        return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()

    def cancel(self) -> None:
        # The reader process only reads: ending it loses nothing (a new one starts).
        process = self._process
        if process is not None:
            with contextlib.suppress(OSError):
                process.kill()

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(CHILD_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _reply(out: BinaryIO, kind: bytes, payload: Any) -> None:
    out.write(kind + len(payload).to_bytes(LENGTH_BYTES, "big"))
    out.write(payload)
    out.flush()


def serve(path: str, busy_timeout_ms: int, requests: BinaryIO, replies: BinaryIO) -> None:
    """The reader process: answer requests on ``requests`` until it closes."""
    import pyarrow as pa

    connection = connect_sqlite(path, busy_timeout_ms)
    while True:
        header = requests.read(LENGTH_BYTES)
        if len(header) < LENGTH_BYTES:
            break
        request = json.loads(requests.read(int.from_bytes(header, "big")))
        try:
            table = connection.query(request["sql"], int(request["batch_rows"]))
        except Exception as exc:  # reported to the parent, which falls back
            _reply(replies, b"E", f"{type(exc).__name__}: {exc}".encode())
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        _reply(replies, b"T", sink.getvalue())
        del table, sink
    connection.close()


def _exit_with_parent(parent: int) -> None:
    """End this process, quietly, as soon as its parent is gone (even mid-query, when
    the closed input pipe would only be noticed at the next request)."""
    import threading

    never = threading.Event()

    def watch() -> None:
        while os.getppid() == parent:
            never.wait(PARENT_CHECK_SECONDS)  # a monotonic wait, whatever the wall clock does
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def child_main(argv: list[str]) -> None:
    """The reader process's entry point (``python -m anomaly_monitor.reading.backends``)."""
    # The parent decides when this process ends (by closing its input, or by dying):
    # a Ctrl-C or SIGTERM sent to the whole process group is the parent's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The parent's pid from its own hands: getppid() here could already be the reaper's.
    _exit_with_parent(int(argv[2]) if len(argv) > 2 else os.getppid())
    # Frames only on the pipe: anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        serve(argv[0], int(argv[1]), sys.stdin.buffer, replies)
    except (BrokenPipeError, ConnectionResetError):  # the parent died mid-reply
        os._exit(0)


if __name__ == "__main__":
    child_main(sys.argv[1:])
