"""What agents print: each agent's stdout and stderr, read on the loop, logged and kept per session.

Every agent process gets two pipes of its own at spawn (``agent_proc/stdio.py`` is the other end).
Their read ends are watched with ``add_reader``: nothing polls. Each line becomes one structured
log line (``agent_output`` with session_id, tenant, pid and stream), a global ``agent_output``
event for whoever subscribed to that type, and joins the session's tail, the last lines an admin
can read (``GET /admin/sessions/{id}/logs``).

Bounds: a line is cut at ``MAX_LINE_BYTES`` (``truncated: true``, the rest of it dropped); a tail
keeps at most ``lines`` lines and ``TAIL_CHARS`` characters; a session may log ``LINE_RATE`` lines a
second (bursts of ``LINE_BURST``): past that, its lines are dropped and counted, and its pipes are
not read until the budget refills, so a flooding agent fills its own pipes and drops its own
writes (it never waits on them) instead of costing the server CPU. The tails of the last
``RETIRED_TAILS`` sessions that left memory stay readable.
"""

import asyncio
import contextlib
import os
import time
from collections import OrderedDict, deque

from corral.supervisor.logs import get_logger
from corral.supervisor.session import TokenBucket

log = get_logger(component="agent")

MAX_LINE_BYTES = 4096
TAIL_CHARS = 64 * 1024
LINE_RATE = 200.0
LINE_BURST = 1000
PAUSE_SECONDS = 0.5  # reading stops this long once a session's line budget is spent (100 lines refill)
RETIRED_TAILS = 256
READ_BYTES = 64 * 1024
STREAMS = ("stdout", "stderr")


class Tail:
    """The last lines of one session's output: bounded in lines and in characters."""

    def __init__(self, lines: int):
        self.lines: deque = deque(maxlen=lines)
        self.chars = 0
        self.dropped = 0  # lines dropped by the rate limit, all time

    def add(self, entry: dict) -> None:
        """Append one line, forgetting the oldest past either bound."""
        if self.lines.maxlen == 0:
            return
        if len(self.lines) == self.lines.maxlen:
            self.chars -= len(self.lines[0]["line"])
        self.lines.append(entry)
        self.chars += len(entry["line"])
        while self.chars > TAIL_CHARS and len(self.lines) > 1:
            self.chars -= len(self.lines.popleft()["line"])

    def last(self, n: int) -> list[dict]:
        """The last ``n`` lines, oldest first."""
        return list(self.lines)[-n:] if n > 0 else []


class LineSplitter:
    """Cuts a byte stream into lines of at most MAX_LINE_BYTES; ``(bytes, truncated)`` pairs."""

    def __init__(self):
        self.partial = b""
        self.skipping = False  # the current line was already cut: drop it up to its newline

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """The complete lines in ``data`` (with what came before it)."""
        pieces = (self.partial + data).split(b"\n")
        self.partial = pieces.pop()
        lines = []
        for piece in pieces:
            if self.skipping:
                self.skipping = False
            else:
                lines.append(_cut(piece))
        if len(self.partial) > MAX_LINE_BYTES:
            if not self.skipping:
                lines.append(_cut(self.partial))
            self.skipping, self.partial = True, b""
        return lines

    def flush(self) -> list[tuple[bytes, bool]]:
        """The last line if it had no newline (the stream has ended)."""
        rest, self.partial = self.partial, b""
        return [_cut(rest)] if rest and not self.skipping else []


def _cut(line: bytes) -> tuple[bytes, bool]:
    """A line within MAX_LINE_BYTES, and whether it had to be cut."""
    if line.endswith(b"\r"):
        line = line[:-1]
    return (line[:MAX_LINE_BYTES], True) if len(line) > MAX_LINE_BYTES else (line, False)


class Capture:
    """One agent process's two pipes, read on the loop until EOF or its exit."""

    def __init__(self, outputs: "AgentOutput", session, pid: int, fds: tuple[int, int]):
        self.outputs = outputs
        self.session = session
        self.pid = pid
        self.fds = dict(zip(fds, STREAMS))
        self.splitters = {fd: LineSplitter() for fd in fds}
        self.bucket = TokenBucket(LINE_RATE, LINE_BURST)
        self.dropped = 0  # lines dropped since the last report
        self.paused: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        for fd in fds:
            os.set_blocking(fd, False)
        self._watch()

    def _watch(self) -> None:
        """Read every open pipe when it has data."""
        for fd in self.fds:
            self.loop.add_reader(fd, self._readable, fd)

    def _unwatch(self) -> None:
        """Stop reading (paused or closing)."""
        for fd in self.fds:
            self.loop.remove_reader(fd)

    def _readable(self, fd: int) -> None:
        """Take one read's worth of lines from a pipe."""
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._lines(fd, self.splitters[fd].feed(data))
        else:
            self._close_one(fd)

    def _lines(self, fd: int, lines: list[tuple[bytes, bool]]) -> None:
        """Log and keep each line the budget allows; pause reading once it is spent."""
        stream = self.fds[fd]
        for raw, truncated in lines:
            wait = self.bucket.take()
            if wait:
                self.dropped += 1
                continue
            if self.dropped:
                self._report_dropped()
            self._emit(stream, raw.decode("utf-8", "replace"), truncated)
        if self.bucket.tokens < 1 and self.paused is None and self.fds:
            self._unwatch()
            self.paused = self.loop.call_later(PAUSE_SECONDS, self._resume)

    def _resume(self) -> None:
        """The line budget has refilled some: read again."""
        self.paused = None
        self._watch()

    def _emit(self, stream: str, text: str, truncated: bool) -> None:
        """One line: a log line and an entry in the session's tail."""
        s = self.session
        extra = {"truncated": True} if truncated else {}
        log.info("agent_output", session_id=s.id, tenant=s.tenant, pid=self.pid, stream=stream, line=text, **extra)
        self.outputs.tail(s).add({"time": time.time(), "pid": self.pid, "stream": stream, "line": text, **extra})
        self.outputs.events.publish_global(
            "agent_output", session_id=s.id, tenant=s.tenant, pid=self.pid, stream=stream, line=text
        )

    def _report_dropped(self) -> None:
        """Say how many lines the rate limit dropped (in the log and the tail)."""
        s, count = self.session, self.dropped
        self.dropped = 0
        self.outputs.tail(s).dropped += count
        log.warning("agent_output_dropped", session_id=s.id, tenant=s.tenant, pid=self.pid, lines=count)
        self.outputs.tail(s).add({"time": time.time(), "pid": self.pid, "stream": "corral",
                                  "line": f"[corral: {count} lines dropped: more than {LINE_RATE:g} a second]"})

    def _close_one(self, fd: int) -> None:
        """A pipe reached EOF (every writer is gone): flush its last line and close it."""
        stream = self.fds.pop(fd)
        self.loop.remove_reader(fd)
        os.close(fd)
        self._flush_lines(stream, self.splitters.pop(fd).flush())

    def _flush_lines(self, stream: str, lines: list[tuple[bytes, bool]]) -> None:
        """Emit the last lines of a closed pipe, ignoring the rate limit (at most one line)."""
        for raw, truncated in lines:
            self._emit(stream, raw.decode("utf-8", "replace"), truncated)

    def close(self) -> None:
        """The process is gone: take what its pipes still hold, then close them."""
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        for fd in list(self.fds):
            with contextlib.suppress(OSError):
                for _ in range(2):  # what a pipe buffers (64 KiB by default), within reason
                    data = os.read(fd, READ_BYTES)
                    if not data:
                        break
                    self._lines(fd, self.splitters[fd].feed(data))
            if fd in self.fds:
                self._close_one(fd)
        if self.dropped:
            self._report_dropped()


class AgentOutput:
    """Every agent's captured output, and each session's tail."""

    def __init__(self, lines: int, events):
        self.lines = lines
        self.events = events  # the supervisor's EventBus
        self.captures: dict[object, Capture] = {}  # session -> its current process's capture
        self.tails: dict[object, Tail] = {}  # session -> its tail, while the session is in memory
        self.retired: OrderedDict[str, Tail] = OrderedDict()  # session key -> tail, sessions gone from memory

    @staticmethod
    def pipes() -> tuple[tuple[int, int], tuple[int, int]]:
        """Two fresh pipes: (read ends, write ends)."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        return (out_r, err_r), (out_w, err_w)

    def attach(self, session, pid: int, read_fds: tuple[int, int]) -> None:
        """Start reading a new process's pipes."""
        self.detach(session)
        self.captures[session] = Capture(self, session, pid, read_fds)

    def detach(self, session) -> None:
        """The session's process is gone: drain and close its pipes."""
        capture = self.captures.pop(session, None)
        if capture is not None:
            capture.close()

    def tail(self, session) -> Tail:
        """The session's tail (made on first use)."""
        tail = self.tails.get(session)
        if tail is None:
            tail = self.tails[session] = self.retired.pop(session.key, None) or Tail(self.lines)
        return tail

    def retire(self, session) -> None:
        """The session leaves memory: keep its tail among the last RETIRED_TAILS."""
        self.detach(session)
        tail = self.tails.pop(session, None)
        if tail is not None and tail.lines:
            self.retired[session.key] = tail
            self.retired.move_to_end(session.key)
            while len(self.retired) > RETIRED_TAILS:
                self.retired.popitem(last=False)

    def lines_of(self, key: str, session=None) -> list[dict] | None:
        """A session's kept lines (oldest first; by its key), or None if nothing is kept for it."""
        tail = self.tails.get(session) if session is not None else None
        tail = tail or self.retired.get(key)
        return None if tail is None else list(tail.lines)

    def close(self) -> None:
        """Close every pipe (the server is stopping)."""
        for session in list(self.captures):
            self.detach(session)
