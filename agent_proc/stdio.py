"""An agent's stdout and stderr: two pipes to the supervisor that never make the agent wait.

The supervisor reads each pipe on its loop and logs every line with the session's id (see
``supervisor/agent_output.py``). If it falls behind and a pipe's buffer is full, what the agent
writes is dropped, not waited for: the agent's turn goes on, and the next write that fits starts
with a ``[corral: N bytes of output dropped]`` line. The pipes are non-blocking for every writer
that shares them, so a program the agent starts may see EAGAIN on a full pipe too.
"""

import fcntl
import io
import os
import sys

DROPPED_NOTICE = "[corral: {} bytes of output dropped]\n"


class DroppingPipe(io.RawIOBase):
    """A non-blocking pipe writer that drops what does not fit instead of waiting."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self.dropped = 0  # bytes dropped since the last write that got through
        self.dropped_total = 0

    def writable(self) -> bool:
        """Always: this is the writing end."""
        return True

    def fileno(self) -> int:
        """The pipe's descriptor (1 or 2)."""
        return self.fd

    def write(self, data) -> int:
        """Write what fits now; count the rest as dropped and report it all taken."""
        size = len(data)
        try:
            if self.dropped:
                # Under PIPE_BUF, so it goes whole or not at all.
                os.write(self.fd, DROPPED_NOTICE.format(self.dropped).encode())
                self.dropped = 0
            return os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += size
            self.dropped_total += size
            return size
        except BrokenPipeError:
            return size  # the supervisor is gone; so are we, shortly


def agent_streams() -> tuple[io.TextIOWrapper, io.TextIOWrapper]:
    """The text streams every agent's sys.stdout and sys.stderr will be, made once in the zygote.

    They write to fds 1 and 2, whatever those are when they write; made before the fork, their
    objects are shared with every child instead of built (and their pages dirtied) in each.
    """
    return _text(1), _text(2)


def attach_stdio(stdout_fd: int, stderr_fd: int, streams: tuple[io.TextIOWrapper, io.TextIOWrapper] | None = None) -> None:
    """In a new agent process: make the two pipe ends its fds 1 and 2 and ``streams`` its sys.stdout/stderr."""
    for fd, target in ((stdout_fd, 1), (stderr_fd, 2)):
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        os.dup2(fd, target)  # dup2 clears close-on-exec: programs the agent starts write here too
        os.close(fd)
    sys.stdout, sys.stderr = streams or agent_streams()


def _text(fd: int) -> io.TextIOWrapper:
    """A line-buffered text stream over a dropping pipe writer."""
    return io.TextIOWrapper(
        io.BufferedWriter(DroppingPipe(fd)), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
