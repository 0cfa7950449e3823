"""The baseline: a bare aiohttp JSON handler doing the chat route's work in-process.

It parses the same JSON body, checks the same fields, and answers with the same shape of JSON
(the echo of the message) — everything ``POST /api/chat`` does except reaching another process.
Run as ``python -m bench.bare --port N``; it uses the same event loop choice as ``corral serve``.
"""

import argparse
import asyncio
import json
import time
import uuid

from aiohttp import web


async def chat(request: web.Request) -> web.Response:
    """Echo the message back with the session fields corral's reply carries."""
    body = json.loads(await request.read())
    message = body["message"]
    if not isinstance(message, str):
        raise web.HTTPBadRequest()
    sid = body.get("session_id") or str(uuid.uuid4())
    reply = {
        "session_id": sid,
        "state": "idle",
        "is_processing": False,
        "message_count": 0,
        "agent_state": {},
        "status": "done",
        "reply": message,
    }
    response = web.json_response(reply)
    response.headers["X-Session-Id"] = sid
    return response


async def ticks(request: web.Request) -> web.StreamResponse:
    """An SSE stream from an in-process generator: a ``delta`` event ``rate`` times a second for ``seconds``.

    The baseline of the streaming figure (bench/stream_scale.py): what aiohttp alone costs per delta.
    """
    rate, seconds = float(request.query["rate"]), float(request.query["seconds"])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        data = json.dumps({"text": f"{time.time():.6f}"})
        await response.write(f"event: delta\ndata: {data}\n\n".encode())
    await response.write(b"event: end\ndata: {}\n\n")
    return response


async def health(request: web.Request) -> web.Response:
    """Liveness for the harness."""
    return web.json_response({"status": "ok"})


def main(argv=None) -> None:
    """Serve the baseline on 127.0.0.1."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", default="auto", help="auto | asyncio | uvloop, as corral serve's --loop")
    args = parser.parse_args(argv)
    app = web.Application()
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/ticks", ticks)
    from corral.web.cli import run_app

    run_app(app, host="127.0.0.1", port=args.port, loop=args.loop)


if __name__ == "__main__":
    main()
