"""An agent's stdout and stderr: one pipe, relayed to the supervisor, that never makes the agent wait.

Fds 1 and 2 are the same pipe, made by the zygote; its output relay holds the read end and sends what
it reads to the supervisor (``output_relay.py``: no descriptor per session in the server for it); what the agent
writes through ``sys.stderr`` has each line marked with ``STDERR_MARK``, a byte UTF-8 text never
holds, so the supervisor tells the streams apart (``supervisor/agent_output.py``). A program the
agent runs writes raw bytes to fd 1 or 2, unmarked: its lines count as stdout.

The supervisor logs every line with the session's id. If the relay falls behind (or stops reading
a flooding agent's pipe for a while) and the pipe's buffer is full, what the agent writes is dropped, not waited for: the agent's
turn goes on, and the next write that fits starts with a ``[corral: N bytes of output dropped]``
line. The pipe is non-blocking for every writer that shares it, so a program the agent starts may
see EAGAIN on a full pipe too.
"""

import fcntl
import io
import os
import sys

DROPPED_NOTICE = "[corral: {} bytes of output dropped]\n"
STDERR_MARK = b"\xff"  # starts each line written through sys.stderr; never in UTF-8 text


class DroppingPipe(io.RawIOBase):
    """A non-blocking pipe writer that drops what does not fit instead of waiting; ``mark`` starts each line."""

    def __init__(self, fd: int, mark: bytes = b""):
        super().__init__()
        self.fd = fd
        self.mark = mark
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
            if not self.mark:
                return os.write(self.fd, data)
            marked = self._marked(bytes(data))
            written = os.write(self.fd, marked)
            if written < len(marked):  # the rest of a marked write cannot be resumed in the caller's terms
                self.dropped += len(marked) - written
                self.dropped_total += len(marked) - written
            return size
        except BlockingIOError:
            self.dropped += size
            self.dropped_total += size
            return size
        except BrokenPipeError:
            return size  # the relay is gone; so are we, shortly

    def _marked(self, data: bytes) -> bytes:
        """``data`` with the mark at the start of each line it begins."""
        marked = self.mark + data.replace(b"\n", b"\n" + self.mark)
        return marked[:-len(self.mark)] if data.endswith(b"\n") else marked


def agent_streams() -> tuple[io.TextIOWrapper, io.TextIOWrapper]:
    """The text streams every agent's sys.stdout and sys.stderr will be, made once in the zygote.

    They write to fds 1 and 2, whatever those are when they write; made before the fork, their
    objects are shared with every child instead of built (and their pages dirtied) in each.
    """
    return _text(1), _text(2, STDERR_MARK)


def attach_stdio(output_fd: int, streams: tuple[io.TextIOWrapper, io.TextIOWrapper] | None = None) -> None:
    """In a new agent process: make the pipe's write end its fds 1 and 2 and ``streams`` its sys.stdout/stderr."""
    flags = fcntl.fcntl(output_fd, fcntl.F_GETFL)
    fcntl.fcntl(output_fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    for target in (1, 2):
        os.dup2(output_fd, target)  # dup2 clears close-on-exec: programs the agent starts write here too
    os.close(output_fd)
    sys.stdout, sys.stderr = streams or agent_streams()


def _text(fd: int, mark: bytes = b"") -> io.TextIOWrapper:
    """A line-buffered text stream over a dropping pipe writer."""
    return io.TextIOWrapper(
        io.BufferedWriter(DroppingPipe(fd, mark)), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
