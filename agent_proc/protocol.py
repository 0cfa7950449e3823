"""The wire format between the supervisor's ROUTER and each agent's DEALER: this module is its one owner.

Every frame is one msgpack array. Supervisor -> agent (a *request*): ``[kind, req_id, body, interrupts]``,
where ``interrupts`` counts the SIGINTs the supervisor had sent this process when it sent the frame
(so a SIGINT that lands before the agent picks the turn up still interrupts that turn).
Agent -> supervisor (a *reply*): ``[kind, req_id, body]``. No token: each agent has its own connection,
made at spawn, so the supervisor knows whose frame it is by where it came from.
Kinds are small ints: they are packed on every message of the hot path.

Both sides build and read frames only through the functions below: ``pack_request``/``unpack_request``
and ``pack_reply``/``unpack_reply`` lay the arrays out, and each kind's body has its own builder
(``start_body``, ``command_body``, ``pack_ready``, ``pack_chunk``, ``pack_done``, ``pack_fail``, ...).
The unpacked frames are plain sequences (they are read on the hot path): ``(kind, req, body, interrupts)``
and ``[kind, req, body]``.
"""

import math

import msgpack

# supervisor -> agent
START = 1  # body: {"history": [{"role", "content"}...], "metadata": {...}}
MESSAGE = 2  # body: user text
SYSTEM = 3  # body: system text
COMMAND = 4  # body: {"command": str, "args": any}
SHUTDOWN = 5  # body: None; the agent runs on_stop and exits 0

# agent -> supervisor
READY = 10  # body: {"pid": int}
CHUNK = 11  # body: a streamed piece of the reply to req_id
DONE = 12  # body: {"reply": any, "state": {...}} ends req_id
FAIL = 13  # body: {"code": str, "message": str, "state"?: {...}} ends req_id

# FAIL codes an agent sends
INTERRUPTED = "interrupted"
UNKNOWN_COMMAND = "unknown_command"
BAD_REQUEST = "bad_request"
UPSTREAM_ERROR = "upstream_error"
AGENT_CRASHED = "agent_crashed"
AGENT_OOM = "agent_oom"
AGENT_BAD_REPLY = "agent_bad_reply"  # a result or snapshot that JSON cannot carry; the agent lives
# a turn that failed with one of these leaves the agent serving: its FAIL carries the snapshot after it
LIVING_FAILURES = frozenset({INTERRUPTED, UNKNOWN_COMMAND, BAD_REQUEST, UPSTREAM_ERROR})

# Bounds of what both msgpack and JSON carry as the same value (requests and results alike):
# msgpack carries integers of at most 64 bits and nests at most a few hundred levels.
INT_RANGE = (-(2**63), 2**64 - 1)
MAX_DEPTH = 64

# An agent exits with this code when its connection breaks the protocol (it cannot trust what follows).
PROTOCOL_ERROR_EXIT_CODE = 3

_packer = msgpack.Packer(use_bin_type=True)


def check_encodable(value) -> None:
    """Raise TypeError, ValueError or OverflowError if msgpack cannot carry ``value`` in a frame's body."""
    _packer.pack(value)


def _decode(data: bytes) -> list:
    """Decode one frame into its array; raises ValueError on garbage or anything but an array."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"undecodable frame: {exc}") from None
    if not isinstance(frame, list):
        raise ValueError("frame is not an array")
    return frame


# supervisor -> agent


def pack_request(kind: int, req: int, body, interrupts: int = 0) -> bytes:
    """Encode a frame for an agent (START, MESSAGE, SYSTEM, COMMAND, SHUTDOWN)."""
    return _packer.pack([kind, req, body, interrupts])


def pack_shutdown(interrupts: int = 0) -> bytes:
    """The SHUTDOWN frame: the agent runs on_stop and exits 0."""
    return pack_request(SHUTDOWN, 0, None, interrupts)


def start_body(history: list, metadata: dict) -> dict:
    """START's body: the session's history so far and its metadata."""
    return {"history": history, "metadata": metadata}


def start_fields(body) -> tuple[list, dict]:
    """START's (history, metadata), empty where the body leaves them out."""
    body = body or {}
    return body.get("history") or [], body.get("metadata") or {}


def command_body(command: str, args) -> dict:
    """COMMAND's body: the command's name and its arguments."""
    return {"command": command, "args": args}


def command_fields(body) -> tuple[str, object]:
    """COMMAND's (command, args); an empty name for a body that is not a map."""
    body = body if isinstance(body, dict) else {}
    return str(body.get("command", "")), body.get("args")


def unpack_request(data: bytes) -> tuple[int, int, object, int]:
    """Decode a frame from the supervisor as (kind, req, body, interrupts); raises ValueError on a broken one."""
    frame = _decode(data)
    if len(frame) < 3:
        raise ValueError(f"frame has {len(frame)} items, not 3 or more")
    return frame[0], frame[1], frame[2], frame[3] if len(frame) > 3 else 0


# agent -> supervisor


def pack_reply(kind: int, req: int, body) -> bytes:
    """Encode a frame for the supervisor (READY, CHUNK, DONE, FAIL)."""
    return _packer.pack([kind, req, body])


def pack_ready(pid: int) -> bytes:
    """READY: the agent's process is up and reads its mailbox."""
    return pack_reply(READY, 0, {"pid": pid})


def pack_chunk(req: int, text) -> bytes:
    """CHUNK: one streamed piece of the reply to ``req``."""
    return pack_reply(CHUNK, req, text)


def pack_done(req: int, reply, state) -> bytes:
    """DONE: ``req`` is answered with ``reply``; ``state`` is the agent's snapshot()."""
    return pack_reply(DONE, req, {"reply": reply, "state": state})


def pack_fail(req: int, code: str, message: str, state: dict | None = None) -> bytes:
    """FAIL: ``req`` ended with an error (one of the FAIL codes above); ``state``, the snapshot after it."""
    return pack_reply(FAIL, req, fail_body(code, message, state))


def fail_body(code: str, message: str, state: dict | None = None) -> dict:
    """FAIL's body (the supervisor also fails turns with one of its own); a living agent's snapshot rides along."""
    body = {"code": code, "message": message}
    if state is not None:
        body["state"] = state
    return body


def unpack_reply(data: bytes) -> list:
    """Decode a frame from an agent as [kind, req, body]; raises ValueError on anything but a 3-item array.

    It returns the decoded list itself, not a copy: the hub calls this for every frame an agent sends.
    """
    frame = _decode(data)
    if len(frame) != 3:
        raise ValueError(f"frame has {len(frame)} items, not 3")
    return frame


def reply_problem(body) -> str | None:
    """Why a DONE body cannot reach an HTTP client as JSON, or None when it can (the result and the state)."""
    if not isinstance(body, dict):
        return "the agent's answer is not a map"
    return done_problem(body.get("reply"), body.get("state"))


def snapshot_problem(body, frame_bytes: int, limit: int) -> str | None:
    """Why a DONE's state is over ``limit`` bytes (as msgpack), or None; a frame within the limit is not measured."""
    if frame_bytes <= limit or not isinstance(body, dict):
        return None
    size = len(msgpack.packb(body.get("state"), use_bin_type=True))
    if size <= limit:
        return None
    return f"the agent's snapshot() is {size} bytes, over the {limit}-byte bound (--max-snapshot-bytes)"


def done_problem(reply, state) -> str | None:
    """Why a DONE's result or state cannot reach an HTTP client as JSON, or None when they can."""
    problem = json_problem(reply)
    if problem is not None:
        return f"the agent's result holds {problem}, which JSON cannot carry"
    problem = json_problem(state)
    if problem is not None:
        return f"the agent's snapshot() holds {problem}, which JSON cannot carry"
    return None


def json_problem(value, depth: int = 0) -> str | None:
    """The first thing in ``value`` that JSON cannot carry as it is (bytes, a set, an object, NaN, ...), or None."""
    if value is None or isinstance(value, (str, bool)):
        return None
    if isinstance(value, int):
        return None if INT_RANGE[0] <= value <= INT_RANGE[1] else "an integer beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"the number {value}"
    if depth > MAX_DEPTH:
        return f"nesting deeper than {MAX_DEPTH} levels"
    if isinstance(value, (list, tuple)):
        return next((p for p in (json_problem(item, depth + 1) for item in value) if p is not None), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"a key of type {type(key).__name__}"
            problem = json_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    return f"a value of type {type(value).__name__}"
