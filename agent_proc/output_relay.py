"""The read ends of every agent's output pipe, held in the zygote: what they hold goes to the supervisor.

The zygote makes each agent's output pipe (stdout and stderr both, ``stdio.py``) and keeps its read
end, so the server holds no descriptor for it: one per session there (its hub connection), not two.
The zygote's serve loop watches every read end with its selector; what is readable is read
(``READ_BYTES`` a pipe a pass) and sent as one ``Output`` record for all of them, by spawn id. The
supervisor splits, bounds and logs the lines (``supervisor/agent_output.py``); when a session's log
budget is spent it sends ``PauseOutput`` and its pipe is not read for that long, so a flooding agent
fills its own pipe and drops its own writes. When an agent exits, what its pipe still holds is read
(``DRAIN_READS`` reads at most) and sent before its ``Exited``, then the pipe is closed.

The read ends live at or above ``base`` (kept free of anything else the zygote opens), so a new
agent closes every other agent's with one ``close_range`` call, touching no Python object.
"""

import fcntl
import os
import resource
import selectors
import time

from corral.agent_proc.zygote_messages import Output

READ_BYTES = 64 * 1024
DRAIN_READS = 2  # at an agent's exit: what a pipe buffers (64 KiB by default), within reason
BATCH_BYTES = 1024 * 1024  # an Output record is sent once it holds this much
PIPE_BASE = 64  # the read ends' lowest number: the zygote's own descriptors stay below it


class OutputRelay:
    """Agents' output pipes: made at spawn, read on the zygote's loop, paused on request, drained at exit."""

    def __init__(self, selector: selectors.BaseSelector, send):
        self.selector = selector
        self.send = send  # sends one record to the supervisor
        self.base = max(PIPE_BASE, _highest_fd() + 1)
        self.top = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if self.top == resource.RLIM_INFINITY:
            self.top = 1 << 20
        self.pipes: dict[int, int] = {}  # spawn id -> its pipe's read end
        self.paused: dict[int, float] = {}  # spawn id -> when (monotonic) its pipe is read again
        self.batch: list[tuple[int, bytes]] = []
        self.batch_bytes = 0

    def open(self) -> tuple[int, int]:
        """A new output pipe: (read end, at or above ``base``; write end), both close-on-exec, reads non-blocking."""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            high = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, self.base)
        except OSError:
            os.close(w)
            raise
        finally:
            os.close(r)
        return high, w

    def watch(self, spawn_id: int, read_fd: int) -> None:
        """Relay what the pipe of ``spawn_id`` holds from now on."""
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
        """The agent is gone: take what its pipe still holds (paused or not), send it, close the pipe."""
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
        self.flush()

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

    def close_in_child(self, keep: int) -> None:
        """In a new agent: close every read end (other agents' output) but descriptor ``keep``, without a loop."""
        if keep >= self.base:  # only if the zygote's own descriptors ever outgrew the space below base
            os.closerange(self.base, keep)
            os.closerange(keep + 1, self.top)
        else:
            os.closerange(self.base, self.top)

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


def _highest_fd() -> int:
    """The highest descriptor this process has open."""
    try:
        return max(int(fd) for fd in os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return 63
