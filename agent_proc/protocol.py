"""The wire format between the supervisor's ROUTER and each agent's DEALER.

Every frame is one msgpack array. Supervisor -> agent: ``[kind, req_id, body, interrupts]``,
where ``interrupts`` counts the SIGINTs the supervisor had sent this process when it sent the frame
(so a SIGINT that lands before the agent picks the turn up still interrupts that turn).
Agent -> supervisor: ``[kind, req_id, body]``. No token: each agent has its own connection,
made at spawn, so the supervisor knows whose frame it is by where it came from.
Kinds are small ints: they are packed on every message of the hot path.
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
FAIL = 13  # body: {"code": str, "message": str} ends req_id

# FAIL codes an agent sends
INTERRUPTED = "interrupted"
UNKNOWN_COMMAND = "unknown_command"
BAD_REQUEST = "bad_request"
UPSTREAM_ERROR = "upstream_error"
AGENT_CRASHED = "agent_crashed"
AGENT_OOM = "agent_oom"
AGENT_BAD_REPLY = "agent_bad_reply"  # a result or snapshot that JSON cannot carry; the agent lives

# Bounds of what both msgpack and JSON carry as the same value (requests and results alike):
# msgpack carries integers of at most 64 bits and nests at most a few hundred levels.
INT_RANGE = (-(2**63), 2**64 - 1)
MAX_DEPTH = 64

# An agent exits with this code when its connection breaks the protocol (it cannot trust what follows).
PROTOCOL_ERROR_EXIT_CODE = 3

_packer = msgpack.Packer(use_bin_type=True)


def pack(frame) -> bytes:
    """Encode one frame."""
    return _packer.pack(frame)


def unpack(data: bytes):
    """Decode one frame; raises ValueError on anything that is not a msgpack array."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"undecodable frame: {exc}") from None
    if not isinstance(frame, list):
        raise ValueError("frame is not an array")
    return frame


def reply_problem(body) -> str | None:
    """Why a DONE body cannot reach an HTTP client as JSON, or None when it can (the result and the state)."""
    if not isinstance(body, dict):
        return "the agent's answer is not a map"
    problem = json_problem(body.get("reply"))
    if problem is not None:
        return f"the agent's result holds {problem}, which JSON cannot carry"
    problem = json_problem(body.get("state"))
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
