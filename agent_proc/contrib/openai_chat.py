"""A chat agent for any OpenAI-compatible API: OpenAI, vLLM, llama.cpp, Ollama, the hosted ones.

Run it with ``corral serve --agent corral.agent_proc.contrib.openai_chat:OpenAIChat`` and configure it in
the server's environment (read by each session's process when it starts):

==============================  ==============================  =========================================
variable                        default                         what
==============================  ==============================  =========================================
``CORRAL_UPSTREAM_OPENAI``      (set by corral)                 the ``openai`` upstream on the egress gateway
``CORRAL_OPENAI_BASE_URL``      ``https://api.openai.com/v1``   the API's base URL (``…/v1``) without one
``CORRAL_OPENAI_MODEL``         (required)                      the model name sent with each request
``CORRAL_OPENAI_API_KEY``       ``$OPENAI_API_KEY``             sent as ``Authorization: Bearer …``
``CORRAL_OPENAI_SYSTEM_PROMPT`` none                            the first message of every conversation
``CORRAL_OPENAI_OPTIONS``       ``{}``                          a JSON object merged into each request
``CORRAL_OPENAI_RETRY_FOR``     ``30``                          seconds a 429/502/503/504 is retried
``CORRAL_OPENAI_READ_TIMEOUT``  ``120``                         seconds without a byte from the API
==============================  ==============================  =========================================

With ``corral serve --upstream openai=https://api.openai.com/v1 --upstream-header 'openai=Authorization:
Bearer env:OPENAI_API_KEY'`` the agent asks the gateway (``CORRAL_UPSTREAM_OPENAI``) and never holds
the key: the gateway adds it. The session's stored history is the conversation; replies stream token
by token. It speaks HTTP with aiohttp (already a corral dependency), imported once in the zygote,
honouring the proxy variables the egress gateway gives (``trust_env``).
"""

import asyncio
import json
import os
from dataclasses import dataclass

import aiohttp

from corral.agent_proc.agent import Agent, BadRequest, ConfigError, UpstreamError

RETRY_STATUSES = frozenset({429, 502, 503, 504})
FIRST_BACKOFF = 0.5  # seconds before the first retry when the API names no Retry-After
MAX_BACKOFF = 8.0
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Settings:
    """What the agent needs to reach the API, read from the environment."""

    base_url: str
    model: str
    api_key: str
    system_prompt: str
    options: dict
    retry_for: float
    read_timeout: float

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        """Read the ``CORRAL_OPENAI_*`` variables; raise BadRequest for a malformed one."""
        try:
            options = json.loads(env.get("CORRAL_OPENAI_OPTIONS") or "{}")
            retry_for = float(env.get("CORRAL_OPENAI_RETRY_FOR") or 30)
            read_timeout = float(env.get("CORRAL_OPENAI_READ_TIMEOUT") or 120)
        except ValueError as exc:
            raise BadRequest(f"bad CORRAL_OPENAI_* setting: {exc}") from None
        if not isinstance(options, dict):
            raise BadRequest("CORRAL_OPENAI_OPTIONS must be a JSON object")
        return cls(
            base_url=(env.get("CORRAL_UPSTREAM_OPENAI") or env.get("CORRAL_OPENAI_BASE_URL")
                      or "https://api.openai.com/v1").rstrip("/"),
            model=env.get("CORRAL_OPENAI_MODEL", ""),
            api_key=env.get("CORRAL_OPENAI_API_KEY") or env.get("OPENAI_API_KEY") or "",
            system_prompt=env.get("CORRAL_OPENAI_SYSTEM_PROMPT", ""),
            options=options,
            retry_for=retry_for,
            read_timeout=read_timeout,
        )


class OpenAIChat(Agent):
    """One conversation with an OpenAI-compatible model, streamed."""

    @classmethod
    def check_config(cls, sandbox):
        """Refuse to start without a model, or with a malformed CORRAL_OPENAI_* setting."""
        try:
            settings = Settings.from_env()
        except BadRequest as exc:
            raise ConfigError(str(exc)) from None
        if not settings.model:
            raise ConfigError("no model configured: set CORRAL_OPENAI_MODEL (e.g. gpt-4o-mini)")
        if not settings.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"CORRAL_OPENAI_BASE_URL must be an http(s) URL, not {settings.base_url!r}")

    def __init__(self, session_id, tenant, metadata=None):
        super().__init__(session_id, tenant, metadata)
        self.settings = Settings.from_env()
        self.messages: list[dict] = []
        self.http: aiohttp.ClientSession | None = None
        self.retries = 0  # rate-limited or overloaded answers retried

    async def on_start(self, history):
        """Open the HTTP client and rebuild the conversation from the stored history."""
        if self.settings.system_prompt:
            self.messages.append({"role": "system", "content": self.settings.system_prompt})
        self.messages += [{"role": m["role"], "content": m["content"]} for m in history if m.get("role") in _ROLES]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.settings.read_timeout)
        self.http = aiohttp.ClientSession(timeout=timeout, trust_env=True)  # through the egress gateway

    async def on_message(self, text):
        """Send the conversation and stream the reply; it joins the conversation once complete."""
        self.messages.append({"role": "user", "content": text})
        reply = []
        async for token in self.complete(self.messages):
            reply.append(token)
            yield token
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    async def on_system(self, text):
        """A system message joins the conversation."""
        self.messages.append({"role": "system", "content": text})
        return "noted"

    async def complete(self, messages: list[dict]):
        """Yield the model's reply token by token; an interrupt (or any failure) cuts the connection."""
        response = await self._open(messages)
        finished = False
        try:
            async for token in _tokens(response):
                yield token
            finished = True
        finally:
            # Closing (not draining) an unfinished stream tells the server to stop generating.
            response.release() if finished else response.close()

    async def _open(self, messages: list[dict]) -> aiohttp.ClientResponse:
        """POST the request; retry a rate limit or overload with backoff until ``retry_for`` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.retry_for
        backoff = FIRST_BACKOFF
        while True:
            response = await self._post(messages)
            if response.status == 200:
                return response
            detail = _error_message(await response.text())
            response.release()
            wait = _retry_after(response.headers, backoff)
            if response.status not in RETRY_STATUSES or loop.time() + wait > deadline:
                raise UpstreamError(f"the model's API answered {response.status}: {detail}")
            self.retries += 1
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _post(self, messages: list[dict]) -> aiohttp.ClientResponse:
        """One streamed chat completion request."""
        body = {**self.settings.options, "model": self.settings.model, "messages": messages, "stream": True}
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        url = f"{self.settings.base_url}/chat/completions"
        try:
            return await self.http.post(url, json=body, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"cannot reach the model's API at {url}: {exc!r}") from None

    async def on_stop(self):
        """Close the HTTP client."""
        if self.http is not None:
            await self.http.close()

    def snapshot(self):
        """The model, the conversation's length and the retries so far."""
        return {"model": self.settings.model, "messages": len(self.messages), "retries": self.retries}


async def _tokens(response: aiohttp.ClientResponse):
    """Yield the content deltas of a chat completion event stream (server-sent events)."""
    try:
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue  # blank lines, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if isinstance(event, dict) and event.get("error"):
                raise UpstreamError(f"the model's stream failed: {_error_message(event)}")
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamError(f"the model's stream broke off: {exc!r}") from None
    except (ValueError, AttributeError) as exc:
        raise UpstreamError(f"the model's stream is not chat completion chunks: {exc}") from None


def _error_message(body) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": …}}``), else the body itself."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error or body)[:500]


def _retry_after(headers, default: float) -> float:
    """Seconds to wait before retrying: the API's Retry-After (in seconds), else ``default``."""
    try:
        return max(0.0, float(headers.get("Retry-After", default)))
    except ValueError:
        return default
