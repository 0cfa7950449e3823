"""HTTP/1.1 over a raw socket: requests split, dripped or malformed as a real network or attacker sends them."""

import asyncio
import json

NETWORK_PAUSE = 0.05  # between two writes: a segment that arrives later, not a wait for anything


def request_head(method: str, path: str, headers: dict | None = None) -> bytes:
    """A request line and headers (Host and Connection: close added), up to the blank line."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def json_post(path: str, body: dict) -> tuple[bytes, bytes]:
    """The head and the body of a JSON POST with a Content-Length."""
    data = json.dumps(body).encode()
    head = request_head("POST", path, {"Content-Type": "application/json", "Content-Length": len(data)})
    return head, data


def chunked(data: bytes, size: int) -> list[bytes]:
    """``data`` in chunked transfer coding, one chunk per ``size`` bytes, then the last chunk."""
    return [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)] + [b"0\r\n\r\n"]


def pieces_of(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into writes of ``size`` bytes."""
    return [data[i:i + size] for i in range(0, len(data), size)]


async def exchange(server, *writes: bytes, pause: float = 0.0) -> tuple[int, dict, bytes]:
    """Send each write (``pause`` seconds apart) on a fresh connection; read the answer to its end."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        for n, data in enumerate(writes):
            if n and pause:
                await asyncio.sleep(pause)  # the network delivering the next segment later
            writer.write(data)
            await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    return parse_response(raw)


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of one HTTP/1.x answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(status_line.split()[1]), headers, body


def _dechunk(body: bytes) -> bytes:
    """The data of a chunked body."""
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2:]
    return out


def json_error_of(status: int, headers: dict, body: bytes) -> dict:
    """The ``error`` object of a JSON error answer (asserting it is one)."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"} and error["message"], error
    return error
