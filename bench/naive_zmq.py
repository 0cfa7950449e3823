"""The second baseline: the bare handler plus one naive zmq.asyncio round trip to a child process.

This is the design the issue quotes (≈ 0.54× of the bare handler on its machine): the handler
sends the message over a ``zmq.asyncio`` DEALER to one echo child (a blocking libzmq ROUTER),
and waits for the answer on a future matched by request id. No sessions, no persistence, no
auth: only the cost of reaching another process the obvious way. corral's warm figure sits
between this and the bare handler when its transport is cheaper than the naive one.
Run as ``python -m bench.naive_zmq --port N``.
"""

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import tempfile
import uuid

from aiohttp import web


def echo_child(endpoint: str) -> None:
    """The child: a ROUTER that answers every [id, message] with itself."""
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


class Link:
    """One zmq.asyncio DEALER to the child; each request waits on its own future."""

    def __init__(self, endpoint: str):
        import zmq
        import zmq.asyncio

        self.sock = zmq.asyncio.Context().socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self.ids = itertools.count()
        self.waiting: dict[bytes, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    async def start(self, app) -> None:
        """Start the task that reads answers."""
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        """Resolve each answer's future."""
        while True:
            rid, message = await self.sock.recv_multipart()
            fut = self.waiting.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(message)

    async def round_trip(self, message: bytes) -> bytes:
        """Send one message to the child and wait for its echo."""
        rid = str(next(self.ids)).encode()
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        await self.sock.send_multipart([rid, message])
        return await fut


def make_app(link: Link) -> web.Application:
    """The bare handler's app with the round trip in its chat route."""

    async def chat(request: web.Request) -> web.Response:
        """Echo the message back through the child, with corral's reply shape."""
        body = json.loads(await request.read())
        message = body["message"]
        if not isinstance(message, str):
            raise web.HTTPBadRequest()
        reply = (await link.round_trip(message.encode())).decode()
        sid = body.get("session_id") or str(uuid.uuid4())
        response = web.json_response({"session_id": sid, "state": "idle", "is_processing": False,
                                      "message_count": 0, "agent_state": {}, "status": "done", "reply": reply})
        response.headers["X-Session-Id"] = sid
        return response

    async def health(request: web.Request) -> web.Response:
        """Liveness for the harness."""
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/health", health)
    app.on_startup.append(link.start)
    return app


def main(argv=None) -> None:
    """Start the echo child, then serve on 127.0.0.1."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", default="auto", help="auto | asyncio | uvloop, as corral serve's --loop")
    args = parser.parse_args(argv)
    run_dir = tempfile.mkdtemp(prefix="corral-naive-")
    endpoint = f"ipc://{os.path.join(run_dir, 'echo.sock')}"
    child = multiprocessing.get_context("spawn").Process(target=echo_child, args=(endpoint,), daemon=True)
    child.start()
    from corral.web.cli import run_app

    try:
        run_app(make_app(Link(endpoint)), host="127.0.0.1", port=args.port, loop=args.loop)
    finally:
        child.kill()


if __name__ == "__main__":
    main()
