"""What agents print: each agent's stdout and stderr, relayed by the zygote's output relay, logged and kept per session.

Every agent process gets one pipe of its own at spawn for both streams (``agent_proc/stdio.py`` is
the writing end: lines written through ``sys.stderr`` start with ``STDERR_MARK``). The zygote's
output relay holds its read end and sends what it reads in ``Output`` records (``agent_proc/output_relay.py``), so a
session holds no descriptor here for its output; the spawner feeds each record to the session's
``Capture``. Nothing polls. Each line becomes one structured log line (``agent_output`` with session_id, tenant, pid and stream), a
global ``agent_output`` event for whoever subscribed to that type, and joins the session's tail,
the last lines an admin can read (``GET /admin/sessions/{id}/logs``).

Bounds, counted as the log writes them (after JSON escaping: a ``\\x01`` byte is six):
- a line is cut at ``MAX_LINE_BYTES`` of escaped text and ends with ``CUT_MARK`` (``truncated: true``,
  the rest of it dropped);
- a session may log ``LINE_RATE`` lines a second (bursts of ``LINE_BURST``) and ``BYTE_RATE`` bytes
  of log a second (bursts of ``BYTE_BURST``; each line counts its escaped text and the fields around
  it). Past either, its lines are dropped and counted, and its pipe is not read for
  ``PAUSE_SECONDS`` (the relay is told: ``PauseOutput``), so a flooding agent fills its own pipe and drops its own writes (it never waits
  on them) instead of costing the server CPU or disk. What was dropped is summed up in one
  ``agent_output_dropped`` log line (lines, bytes, which bound) when output next gets through and
  when the process ends, and in the tail.
A tail keeps at most ``lines`` lines and ``TAIL_CHARS`` characters. The tails of the last
``RETIRED_TAILS`` sessions that left memory stay readable.
"""

import time
from collections import OrderedDict, deque
from json.encoder import encode_basestring_ascii

from corral.agent_proc.stdio import STDERR_MARK
from corral.supervisor.logs import get_logger
from corral.supervisor.session import TokenBucket

log = get_logger(component="agent")

MAX_LINE_BYTES = 4096
CUT_MARK = " [corral: line cut]"
TAIL_CHARS = 64 * 1024
LINE_RATE = 200.0
LINE_BURST = 1000
BYTE_RATE = 64 * 1024.0
BYTE_BURST = 256 * 1024
# What an agent_output log line costs besides its text and ids: event, level, timestamp, keys, pid, stream.
LINE_OVERHEAD = 160
PAUSE_SECONDS = 0.5  # reading stops this long once a session's budget is spent (100 lines, 32 KiB refill)
RETIRED_TAILS = 256


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


def escaped_size(text: str) -> int:
    """Bytes ``text`` takes in a JSON log line (the renderer escapes to ASCII)."""
    return len(encode_basestring_ascii(text)) - 2


def fit(text: str, truncated: bool = False) -> tuple[str, int, bool]:
    """``text`` cut so its escaped size is within MAX_LINE_BYTES, marked if cut (here or before, ``truncated``).

    Returns (text, its escaped size, whether it was cut).
    """
    size = escaped_size(text)
    if size > MAX_LINE_BYTES:
        n, truncated = len(text), True
        while size > MAX_LINE_BYTES:
            n = n * MAX_LINE_BYTES // size  # strictly shorter each time, so this ends
            size = escaped_size(text[:n])
        text = text[:n]
    return (text + CUT_MARK, size + len(CUT_MARK), True) if truncated else (text, size, False)


def parse_line(raw: bytes, truncated: bool) -> tuple[str, str, int, bool]:
    """One raw line of the pipe: its stream, its text as logged, that text's escaped size, whether it was cut."""
    stream = "stdout"
    if raw.startswith(STDERR_MARK):
        stream, raw = "stderr", raw.replace(STDERR_MARK, b"")
    return (stream, *fit(raw.decode("utf-8", "replace"), truncated))


class Capture:
    """One agent process's output, fed by the spawner as the output relay sends it, until the process is gone."""

    def __init__(self, outputs: "AgentOutput", session):
        self.outputs = outputs
        self.session = session
        self.pid: int | None = None  # known with its first output
        self.closed = False
        self.splitter = LineSplitter()
        self.line_budget = TokenBucket(LINE_RATE, LINE_BURST)
        self.byte_budget = TokenBucket(BYTE_RATE, BYTE_BURST)
        self.overhead = LINE_OVERHEAD + len(session.id) + len(session.tenant)
        self.dropped_lines = self.dropped_bytes = 0  # since the last report
        self.dropped_by: set[str] = set()  # which bounds dropped them
        self.paused_until = 0.0  # monotonic: the relay was asked not to read the pipe before then

    def feed(self, pid: int, data: bytes) -> float:
        """What the process wrote (its pipe, read by the output relay); seconds its pipe should not be read for (0: read on)."""
        if self.closed:
            return 0.0
        self.pid = pid
        return self._lines(self.splitter.feed(data))

    def _lines(self, lines: list[tuple[bytes, bool]]) -> float:
        """Log and keep each line the budgets allow; once one is spent, PAUSE_SECONDS (if not paused already)."""
        for raw, truncated in lines:
            stream, text, size, truncated = parse_line(raw, truncated)
            if not self._admit(size + self.overhead, len(raw)):
                continue
            if self.dropped_lines:
                self._report_dropped()
            self._emit(stream, text, truncated)
        spent = self.line_budget.tokens < 1 or self.byte_budget.tokens < MAX_LINE_BYTES + self.overhead
        now = time.monotonic()
        if spent and now >= self.paused_until:
            self.paused_until = now + PAUSE_SECONDS
            return PAUSE_SECONDS
        return 0.0

    def _admit(self, cost: int, raw_size: int) -> bool:
        """Whether a line of ``cost`` log bytes fits both budgets now; count it dropped if not."""
        if self.line_budget.take():
            self.dropped_by.add(f"{LINE_RATE:g} lines a second")
        elif self.byte_budget.take(cost):
            self.line_budget.tokens += 1  # not logged: give its line back
            self.dropped_by.add(f"{BYTE_RATE / 1024:g} KiB of log a second")
        else:
            return True
        self.dropped_lines += 1
        self.dropped_bytes += raw_size + 1
        return False

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
        """Sum up what the budgets dropped since the last report (in the log and the tail)."""
        s, lines, size, why = self.session, self.dropped_lines, self.dropped_bytes, " and ".join(sorted(self.dropped_by))
        self.dropped_lines = self.dropped_bytes = 0
        self.dropped_by = set()
        self.outputs.tail(s).dropped += lines
        log.warning("agent_output_dropped", session_id=s.id, tenant=s.tenant, pid=self.pid, lines=lines, bytes=size,
                    bound=why)
        self.outputs.tail(s).add({"time": time.time(), "pid": self.pid, "stream": "corral",
                                  "line": f"[corral: {lines} lines dropped ({size} bytes): more than {why}]"})

    def close(self) -> None:
        """The process is gone (what its pipe still held came before its exit): log its last line, sum up drops."""
        if self.closed:
            return
        self.closed = True
        for raw, truncated in self.splitter.flush():  # at most one line: past the budgets too
            stream, text, _, truncated = parse_line(raw, truncated)
            self._emit(stream, text, truncated)
        if self.dropped_lines:
            self._report_dropped()


class AgentOutput:
    """Every agent's captured output, and each session's tail."""

    def __init__(self, lines: int, events):
        self.lines = lines
        self.events = events  # the supervisor's EventBus
        self.captures: dict[object, Capture] = {}  # session -> its current process's capture
        self.tails: dict[object, Tail] = {}  # session -> its tail, while the session is in memory
        self.retired: OrderedDict[str, Tail] = OrderedDict()  # session key -> tail, sessions gone from memory

    def attach(self, session) -> Capture:
        """The capture a new process of the session writes to (given to the launcher)."""
        self.detach(session)
        capture = self.captures[session] = Capture(self, session)
        return capture

    def detach(self, session) -> None:
        """The session's process is gone (or never came): close its capture."""
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
        """Close every capture (the server is stopping)."""
        for session in list(self.captures):
            self.detach(session)
