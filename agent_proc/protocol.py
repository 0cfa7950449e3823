"""The wire format between the supervisor's ROUTER and each agent's DEALER.

Every frame is one msgpack array. Supervisor -> agent: ``[kind, req_id, body, interrupts]``,
where ``interrupts`` counts the SIGINTs the supervisor had sent this process when it sent the frame
(so a SIGINT that lands before the agent picks the turn up still interrupts that turn).
Agent -> supervisor: ``[kind, req_id, body]``. No token: each agent has its own connection,
made at spawn, so the supervisor knows whose frame it is by where it came from.
Kinds are small ints: they are packed on every message of the hot path.
"""

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
AGENT_CRASHED = "agent_crashed"
AGENT_OOM = "agent_oom"

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
