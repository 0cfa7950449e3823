"""A local OpenAI-compatible chat completions API for the ready agents' figures.

It streams a fixed short reply (five chunks, then ``[DONE]``) at once, so a figure taken through it
is corral's and the agent's cost plus one loopback HTTP exchange, not a model's.
Run as ``python -m bench.fake_openai --port N``.
"""

import argparse
import json

from aiohttp import web

from bench.bare import health

REPLY = ["Hello", ", ", "I am ", "a fake ", "model."]


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, streamed."""
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for token in REPLY:
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": token}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


def main(argv=None) -> None:
    """Serve on 127.0.0.1."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
