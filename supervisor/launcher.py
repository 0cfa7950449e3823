"""What the supervisor asks of a process launcher: the ``Launcher`` base class (as jupyter_client's
provisioner base), and the records it hands back.

``ZygoteSpawner`` (supervisor/spawner.py) is the launcher corral ships: it forks agents from a
pre-warmed zygote. Another one (a container, a remote host) subclasses ``Launcher`` and is given as
``Supervisor(config, launcher=MyLauncher)``; the lifecycle builds it with the keyword arguments
below and builds it again when ``on_lost`` says it is gone.
"""

import abc
import asyncio
import errno
import signal
import socket
from dataclasses import dataclass
from typing import Protocol

# The wait status reported for agents that died with their launcher (the zygote).
LAUNCHER_DIED = -1

# A launch refused for want of a resource: the code the client's 503 carries, by OS error.
RESOURCE_CODES = {
    errno.EMFILE: "out_of_descriptors", errno.ENFILE: "out_of_descriptors",
    errno.EAGAIN: "out_of_processes", errno.ENOMEM: "out_of_memory", errno.EUSERS: "out_of_uids",
}


class SpawnError(Exception):
    """The launcher could not start a process; ``retry_after`` is the client's hint (seconds), ``code``
    the 503's (``unavailable``, or which resource ran out)."""

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str = "unavailable"):
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code

    @classmethod
    def from_os_error(cls, message: str, err: int | None, *, retry_after: float = 1.0) -> "SpawnError":
        """A SpawnError whose code names the resource the OS error ``err`` says ran out."""
        return cls(message, retry_after=retry_after, code=RESOURCE_CODES.get(err, "unavailable"))


class OutputSink(Protocol):
    """Where a launched process's stdout and stderr go (``supervisor/agent_output.py``'s ``Capture``)."""

    def feed(self, pid: int, data: bytes) -> float:
        """Take what the process ``pid`` wrote; seconds its output should not be read for (0: read on)."""


@dataclass(frozen=True)
class Exit:
    """How an agent process ended: its wait status, the memory limit's verdict, in words."""

    status: int
    oom: bool
    description: str
    cpu_seconds: float | None = None  # user + system of the process and the children it reaped (wait4)


@dataclass(eq=False)
class AgentProcess:
    """One launched agent process: its pid, what was set up for it, and its exit (a future)."""

    spawn_id: int
    exited: asyncio.Future  # resolves to an Exit once the process is gone and its limits released
    pid: int | None = None
    limits: dict | None = None
    sandbox: dict | None = None
    egress_token: str | None = None  # its grant at the egress gateway, revoked when it is gone
    output: OutputSink | None = None  # what its stdout and stderr are fed to


class Launcher(abc.ABC):
    """Starts agent processes and reports their ends: everything the supervisor does to a process.

    Built as ``Launcher(agent_spec, limiter=..., sandbox=..., on_lost=...)``: ``limiter`` and
    ``sandbox`` prepare and release each process's memory limit and confinement; ``on_lost`` is
    called (once) when the launcher can launch no more and every process it launched is gone.
    """

    pid: int | None = None  # the launcher's own process, if it has one (the zygote's)

    @abc.abstractmethod
    async def start(self) -> None:
        """Be ready to launch; raise SpawnError if that cannot be."""

    @abc.abstractmethod
    async def launch(self, key: str, request: dict, conn: socket.socket, *,
                     output: OutputSink | None = None) -> AgentProcess:
        """Start one agent speaking on ``conn`` (what it writes to stdout and stderr fed to ``output``); SpawnError if not.

        ``key`` names its per-process resources; ``request`` holds session_id, routing_id and tenant.
        The returned process's ``exited`` future resolves to an ``Exit`` once it is gone.
        """

    @abc.abstractmethod
    def signal(self, proc: AgentProcess, sig: int) -> bool:
        """Send ``sig`` to the process (and what it started); False if it is gone."""

    def kill(self, proc: AgentProcess) -> bool:
        """SIGKILL the process (and what it started)."""
        return self.signal(proc, signal.SIGKILL)

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop launching; end what is left and release it."""

