"""The messages between the supervisor's spawner and the zygote: typed records and their one codec.

Both sides import this module (the supervisor may import agent_proc; the zygote imports nothing of
the supervisor). A record goes on the pipe as a pickled tuple, its kind then its fields in
declaration order: plain pickle over ``send_bytes`` costs ~3 µs a message where
``multiprocess``'s ``Connection.send`` (dill) costs ~100 µs, paid on each side of every spawn and
every exit. A kind the reader does not know is a ``ValueError``, not a silent mismatch.

Supervisor → zygote: ``Start`` once, then ``Spawn``, ``Quit``. Zygote → supervisor: ``Ready`` or ``Failed``
once at start, then ``SpawnFailed`` for a ``Spawn`` that failed. The zygote's output relay
(``output_relay.py``) → supervisor, on a pipe of its own: ``Spawned`` per child forked, ``Output`` as
agents write, ``Exited`` per child, all by spawn id (so an exit is never read before the supervisor
can tell whose it is), a child's output after its ``Spawned`` and before its ``Exited``; supervisor →
relay: ``PauseOutput``.
"""

import dataclasses
import pickle
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Start:
    """The zygote's first message: what to load and how to confine it (nothing secret: see ``boot``)."""

    agent: str
    supervisor_pid: int
    options: dict | None
    sys_path: list  # the supervisor's, so agent modules import as they would there


@dataclass(frozen=True, slots=True)
class Ready:
    """The zygote has imported the agent and can fork; ``fork`` says how (agent_proc/forking.py), ``heap``
    whether the objects its children share are immortal (agent_proc/immortal.py)."""

    pid: int
    fork: str
    heap: str = "counted"


@dataclass(frozen=True, slots=True)
class Failed:
    """The zygote could not start (the agent does not import, the sandbox cannot be set up)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Spawn:
    """Fork one agent. Its hub connection comes just before; ``output``: capture its stdout and stderr (``Output``)."""

    spawn_id: int
    session_id: str
    routing_id: bytes | None  # None: the session id, encoded
    tenant: str
    limits: dict | None
    sandbox: dict | None
    output: bool
    env: dict | None = None  # variables over the zygote's environment (the tenant's, the egress gateway's)


@dataclass(frozen=True, slots=True)
class Spawned:
    """The agent of ``spawn_id`` was forked as ``pid``."""

    spawn_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    """The agent of ``spawn_id`` could not be forked; ``errno`` is the OS error's number when there was one."""

    spawn_id: int
    reason: str
    errno: int | None = None


@dataclass(frozen=True, slots=True)
class Exited:
    """The agent of ``spawn_id`` is gone (reaped) with this wait status."""

    spawn_id: int
    status: int
    cpu_seconds: float | None = None  # user + system of the agent and the children it reaped (wait4), for usage


@dataclass(frozen=True, slots=True)
class Output:
    """What agents wrote to their output pipes since the last one: ``(spawn_id, bytes)`` pairs, in order."""

    chunks: tuple


@dataclass(frozen=True, slots=True)
class PauseOutput:
    """Do not read the output pipe of ``spawn_id`` for ``seconds`` (its log budget is spent)."""

    spawn_id: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Quit:
    """The supervisor is closing: the zygote leaves (its children's death signal takes them)."""


MESSAGES = (Start, Ready, Failed, Spawn, Spawned, SpawnFailed, Output, PauseOutput, Exited, Quit)
_KINDS = {cls: cls.__name__ for cls in MESSAGES}
_CLASSES = {cls.__name__: cls for cls in MESSAGES}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGES}


def encode(msg) -> bytes:
    """One record as bytes: its kind, then its fields in order."""
    cls = type(msg)
    return pickle.dumps((_KINDS[cls], *(getattr(msg, name) for name in _FIELDS[cls])), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes):
    """The record ``encode`` made; ValueError for a kind or shape this side does not know."""
    kind, *values = pickle.loads(data)
    cls = _CLASSES.get(kind)
    if cls is None:
        raise ValueError(f"unknown zygote message {kind!r}")
    try:
        return cls(*values)
    except TypeError as exc:
        raise ValueError(f"malformed zygote message {kind!r}: {exc}") from None


def send(conn, msg) -> None:
    """Send one record on the supervisor <-> zygote pipe (a ``multiprocess`` Connection)."""
    conn.send_bytes(encode(msg))


def recv(conn):
    """Receive one record sent with ``send``."""
    return decode(conn.recv_bytes())
