"""The output relay: a process the zygote forks at its start, holding the read end of every agent's output pipe.

The zygote makes each agent's output pipe (stdout and stderr both, ``stdio.py``), forks the agent,
and hands the read end to the relay with the agent's ``Spawned`` record (SCM_RIGHTS over a socket
pair of their own), keeping no copy: the server holds no descriptor for it (one per session there,
its hub connection, not two), and neither the zygote nor any agent holds another agent's. The relay
watches every read end with a selector; what is readable is read (``READ_BYTES`` a pipe a pass) and
sent to the supervisor as one ``Output`` record for all of them, by spawn id, over a pipe of its own.
The supervisor splits, bounds and logs the lines (``supervisor/agent_output.py``); when a session's
log budget is spent it sends the relay ``PauseOutput`` and the pipe is not read for that long, so a
flooding agent fills its own pipe and drops its own writes.

Every ``Spawned`` and ``Exited`` record goes to the supervisor through here, so a spawn's output
comes after its pid and before its exit: on ``Exited`` the relay first reads what the agent's pipe
still holds (``DRAIN_READS`` reads at most), sends it, closes the pipe, then forwards the record.

Why a process and not the zygote's own loop: ``fork`` gives a child a descriptor table as large as
its parent's highest descriptor, never shrunk by closing; a zygote holding N read ends would give
every agent a table of N entries (~130 KiB of kernel memory each at 10,000; docs/benchmarks.md).
"""

import contextlib
import os
import selectors
import socket
import time

from corral.agent_proc.process import arm_death_signal, set_title
from corral.agent_proc.sandbox import parent_gone, set_capabilities
from corral.agent_proc.zygote_messages import Exited, Output, PauseOutput, Spawned, decode, encode, recv, send

READ_BYTES = 64 * 1024
DRAIN_READS = 2  # at an agent's exit: what a pipe buffers (64 KiB by default), within reason
BATCH_BYTES = 1024 * 1024  # an Output record is sent once it holds this much
RECORD_BYTES = 4096  # the most a zygote -> relay record takes (Spawned, Exited)


def start(supervisor_conn, close: tuple) -> tuple[int, socket.socket]:
    """In the zygote, before any agent: fork the relay; its pid and the zygote's socket to it.

    ``supervisor_conn`` is the relay's pipe to the supervisor (the zygote closes its copy);
    ``close`` the zygote's descriptors the relay has no use for. It dies with the zygote.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        try:
            set_title("corral: output relay")
            arm_death_signal()
            if parent_gone(zygote):
                os._exit(0)
            for fd in (*close, ours.fileno(), zygote):
                os.close(fd)
            with contextlib.suppress(OSError):
                set_capabilities(0)  # it reads pipes and writes to the supervisor: nothing the zygote kept is its
            run(theirs, supervisor_conn)
        finally:
            os._exit(0)
    os.close(zygote)
    theirs.close()
    supervisor_conn.close()
    return pid, ours


def report(relay: socket.socket, msg, read_fd: int | None = None) -> None:
    """From the zygote: a ``Spawned`` (with the agent's pipe's read end, if it has one) or ``Exited`` record."""
    data = encode(msg)
    if read_fd is None:
        relay.send(data)
    else:
        socket.send_fds(relay, [data], [read_fd])


def run(zygote: socket.socket, conn) -> None:
    """The relay's loop: the zygote's records, the supervisor's pauses, the pipes; until either side is gone."""
    selector = selectors.DefaultSelector()
    relay = OutputRelay(selector, lambda msg: send(conn, msg))
    selector.register(zygote.fileno(), selectors.EVENT_READ, "zygote")
    selector.register(conn.fileno(), selectors.EVENT_READ, "supervisor")
    while True:
        ready = sorted(selector.select(relay.timeout()), key=_records_first)
        for key, _ in ready:
            if key.data == "zygote":
                if not relay.from_zygote(zygote):
                    return
            elif key.data == "supervisor":
                try:
                    msg = recv(conn)
                except (EOFError, OSError, ValueError):
                    return
                if isinstance(msg, PauseOutput):
                    relay.pause(msg.spawn_id, msg.seconds)
            else:
                relay.read(key.data)  # a spawn id: its agent wrote
        relay.flush()
        relay.resume_due()


def _records_first(ready: tuple) -> bool:
    """Sort key of a select's results: records and pauses before the pipes are read."""
    return not isinstance(ready[0].data, str)


class OutputRelay:
    """Agents' output pipes: watched from their spawn, read, paused on request, drained at exit."""

    def __init__(self, selector: selectors.BaseSelector, send):
        self.selector = selector
        self.send = send  # sends one record to the supervisor
        self.pipes: dict[int, int] = {}  # spawn id -> its pipe's read end
        self.paused: dict[int, float] = {}  # spawn id -> when (monotonic) its pipe is read again
        self.batch: list[tuple[int, bytes]] = []
        self.batch_bytes = 0

    def from_zygote(self, zygote: socket.socket) -> bool:
        """Forward one record of the zygote's: a spawn's pipe is watched after it, an exit's drained before; False at the end."""
        try:
            data, fds, _, _ = socket.recv_fds(zygote, RECORD_BYTES, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return False
        if not data:
            return False
        msg = decode(data)
        if isinstance(msg, Exited):
            self.drain(msg.spawn_id)
        self.flush()
        self.send(msg)
        if isinstance(msg, Spawned) and fds:
            self.watch(msg.spawn_id, fds[0])
        return True

    def watch(self, spawn_id: int, read_fd: int) -> None:
        """Relay what the pipe of ``spawn_id`` holds from now on."""
        os.set_blocking(read_fd, False)
        self.pipes[spawn_id] = read_fd
        self.selector.register(read_fd, selectors.EVENT_READ, spawn_id)

    def read(self, spawn_id: int) -> None:
        """Take one read's worth from a readable pipe; close it at EOF (every writer is gone)."""
        fd = self.pipes.get(spawn_id)
        if fd is None or spawn_id in self.paused:
            return
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._add(spawn_id, data)
        else:
            self._close(spawn_id)

    def drain(self, spawn_id: int) -> None:
        """The agent is gone: queue what its pipe still holds (paused or not), close the pipe."""
        fd = self.pipes.get(spawn_id)
        if fd is None:
            return
        for _ in range(DRAIN_READS):
            try:
                data = os.read(fd, READ_BYTES)
            except OSError:
                break
            if not data:
                break
            self._add(spawn_id, data)
        self._close(spawn_id)

    def pause(self, spawn_id: int, seconds: float) -> None:
        """Leave the pipe of ``spawn_id`` unread for ``seconds``."""
        fd = self.pipes.get(spawn_id)
        if fd is not None and spawn_id not in self.paused:
            self.selector.unregister(fd)
            self.paused[spawn_id] = time.monotonic() + seconds

    def timeout(self) -> float | None:
        """Seconds until a paused pipe is to be read again (None: none is paused)."""
        if not self.paused:
            return None
        return max(0.0, min(self.paused.values()) - time.monotonic())

    def resume_due(self) -> None:
        """Watch again every pipe whose pause is over."""
        if not self.paused:
            return
        now = time.monotonic()
        for spawn_id in [sid for sid, until in self.paused.items() if until <= now]:
            del self.paused[spawn_id]
            self.selector.register(self.pipes[spawn_id], selectors.EVENT_READ, spawn_id)

    def flush(self) -> None:
        """Send what was read since the last record, if anything."""
        if self.batch:
            batch, self.batch, self.batch_bytes = self.batch, [], 0
            self.send(Output(tuple(batch)))

    def _add(self, spawn_id: int, data: bytes) -> None:
        """Queue what was read for the next record."""
        self.batch.append((spawn_id, data))
        self.batch_bytes += len(data)
        if self.batch_bytes >= BATCH_BYTES:
            self.flush()

    def _close(self, spawn_id: int) -> None:
        """Stop watching a pipe and close it."""
        fd = self.pipes.pop(spawn_id)
        if self.paused.pop(spawn_id, None) is None:
            self.selector.unregister(fd)
        os.close(fd)
