"""Who a worker is, and whether the process behind a lease owner still lives.

A lease owner reads ``host:pid:namespace:token.n``: the host name and process
id, a short hash of this boot and PID namespace (two containers may share a
host name and a pid), the process's random token and the worker's number in
the process. The token is also the PostgreSQL ``application_name`` of the
process's connections (``anomaly-monitor <token>``), so a successor on any host
can see whether the leader's database sessions are gone.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

#: This process's random token (a new one after every restart).
PROCESS_TOKEN = uuid.uuid4().hex[:12]
#: The PostgreSQL ``application_name`` of this process's connections.
APPLICATION_NAME = f"anomaly-monitor {PROCESS_TOKEN}"
_WORKER_NUMBERS = itertools.count(1)


def _namespace() -> str:
    """A hash of the boot id and the PID namespace: equal only for processes whose
    pids can be checked against each other; empty where the system does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot} {pid_namespace}".encode()).hexdigest()[:8]


NAMESPACE = _namespace()


@dataclass(frozen=True)
class Owner:
    """A parsed lease owner."""

    host: str
    pid: int
    namespace: str
    token: str

    @property
    def application_name(self) -> str:
        """The ``application_name`` of the owner's PostgreSQL sessions."""
        return f"anomaly-monitor {self.token}"


def worker_identity() -> str:
    """A lease owner name for a new worker of this process (unique across hosts,
    restarts and the workers of one process)."""
    return (f"{socket.gethostname()}:{os.getpid()}:{NAMESPACE}:{PROCESS_TOKEN}."
            f"{next(_WORKER_NUMBERS)}")


def parse_owner(owner: str) -> Owner | None:
    """The parts of an owner written by :func:`worker_identity`; ``None`` for other
    forms (older releases wrote ``host:pid:uuid``), whose liveness is unknown."""
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    host, pid, namespace, token = parts
    return Owner(host, int(pid), namespace, token.partition(".")[0])


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def local_process_dead(owner: Owner) -> bool:
    """Whether ``owner`` names a process of this host and PID namespace that no longer
    runs (exited, killed, or a zombie). ``False`` when that cannot be known."""
    if not owner.namespace or owner.namespace != NAMESPACE:
        return False
    if owner.host != socket.gethostname() or owner.token == PROCESS_TOKEN:
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: it exists
        return False
    # The pid runs, but it may have been reused by a process that is not the owner.
    return _zombie(owner.pid)
