"""The demo agent that ``corral serve`` runs by default.

It remembers facts told to it in its session ("my name is Alice" -> "Your name is Alice."),
streams its replies word by word, and has commands that exercise the supervisor: ``sleep``
(for interrupt), ``allocate`` (for the memory limit), ``crash`` (for isolation) and ``spin``
(for CPU figures). ``AsyncDemoAgent`` is the same agent written with async hooks.
"""

import asyncio
import inspect
import os
import re
import signal
import time

from corral.agent_proc.agent import Agent, BadRequest, UnknownCommand

_TELL = re.compile(r"\bmy\s+([a-z][a-z ]{0,40}?)\s+is\s+(.+?)\s*[.!]*$", re.IGNORECASE)
_ASK = re.compile(r"\bwhat(?:'s|\s+is)\s+my\s+([a-z][a-z ]{0,40}?)\s*\??$", re.IGNORECASE)
_MIB = 1024 * 1024


def _number(args, key: str, *, low: float, high: float) -> float:
    """Read a bounded number from a command's args."""
    value = args.get(key) if isinstance(args, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadRequest(f"'{key}' must be a number from {low} to {high}")
    return value


class DemoAgent(Agent):
    """Remembers facts per session; streams replies."""

    def __init__(self, session_id, tenant, metadata=None):
        super().__init__(session_id, tenant, metadata)
        self.facts: dict[str, str] = {}
        self.system_notes: list[str] = []
        self.turns = 0
        self._ballast: list[bytearray] = []

    def on_start(self, history):
        """Relearn the facts from the stored conversation."""
        for item in history:
            if item.get("role") == "user":
                self._learn(item.get("content", ""))
            elif item.get("role") == "system":
                self.system_notes.append(item.get("content", ""))

    def _learn(self, text: str) -> tuple[str, str] | None:
        """Remember a "my X is Y" fact, if the text states one."""
        match = _TELL.search(text.strip())
        if not match or _ASK.search(text.strip()):
            return None
        key, value = match.group(1).lower().strip(), match.group(2).strip()
        self.facts[key] = value
        return key, value

    def _answer(self, text: str) -> str:
        """Compose the reply to one user message."""
        ask = _ASK.search(text.strip())
        if ask:
            key = ask.group(1).lower().strip()
            if key in self.facts:
                return f"Your {key} is {self.facts[key]}."
            return f"I don't know your {key} yet."
        learned = self._learn(text)
        if learned:
            return f"Got it: your {learned[0]} is {learned[1]}."
        return f"You said: {text}"

    def on_message(self, text):
        """Stream the reply word by word."""
        self.turns += 1
        words = self._answer(text).split(" ")
        for i, word in enumerate(words):
            yield word if i == len(words) - 1 else word + " "

    def on_system(self, text):
        """Keep system notes; they show in the state snapshot."""
        self.system_notes.append(text)
        return "noted"

    def on_command(self, command, args):
        """sleep / allocate / crash / spin / facts."""
        handler = getattr(self, f"cmd_{command}", None)
        if handler is None:
            raise UnknownCommand(command)
        return handler(args if args is not None else {})

    def cmd_sleep(self, args):
        """Sleep n seconds (interruptible: SIGINT ends the turn)."""
        seconds = _number(args, "seconds", low=0, high=3600)
        time.sleep(seconds)
        return {"slept": seconds}

    def cmd_spin(self, args):
        """Keep one CPU busy for n seconds."""
        seconds = _number(args, "seconds", low=0, high=3600)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
        return {"spun": seconds, "iterations": n}

    def cmd_allocate(self, args):
        """Allocate and touch n MiB, and keep it."""
        mib = int(_number(args, "mib", low=0, high=1024 * 1024))
        block = bytearray(mib * _MIB)
        for offset in range(0, len(block), 4096):  # touch every page so it counts as resident
            block[offset] = 1
        self._ballast.append(block)
        return {"allocated_mib": mib, "held_mib": sum(len(b) for b in self._ballast) // _MIB}

    def cmd_crash(self, args):
        """Die the way asked: exit, signal or an unhandled exception."""
        how = args.get("how", "exit") if isinstance(args, dict) else "exit"
        if how == "exit":
            os._exit(3)
        if how == "signal":
            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(10)  # the signal is delivered before this returns
        if how == "exception":
            raise RuntimeError("demo agent crashed on request")
        raise BadRequest("'how' must be one of exit, signal, exception")

    def cmd_facts(self, args):
        """The facts remembered so far."""
        return dict(self.facts)

    def snapshot(self):
        """Facts, turn count and system notes."""
        return {"facts": dict(self.facts), "turns": self.turns, "system_notes": self.system_notes[-5:]}


class AsyncDemoAgent(DemoAgent):
    """The demo agent with async hooks: the same replies, on the agent process's event loop.

    ``sleep`` awaits (an interrupt cancels it, and ``cancelled`` in the snapshot counts the
    CancelledErrors it saw); ``block`` sleeps without awaiting, blocking the loop.
    """

    def __init__(self, session_id, tenant, metadata=None):
        super().__init__(session_id, tenant, metadata)
        self.cancelled = 0

    async def on_start(self, history):
        """Relearn the facts, after yielding to the loop once."""
        await asyncio.sleep(0)
        super().on_start(history)

    async def on_message(self, text):
        """Stream the reply word by word, yielding to the loop between words."""
        for chunk in super().on_message(text):
            await asyncio.sleep(0)
            yield chunk

    async def on_system(self, text):
        """Keep system notes."""
        return super().on_system(text)

    async def on_command(self, command, args):
        """The demo's commands; the async ones are awaited."""
        result = super().on_command(command, args)
        return await result if inspect.isawaitable(result) else result

    async def cmd_sleep(self, args):
        """Await n seconds; count a cancellation before letting it end the turn."""
        seconds = _number(args, "seconds", low=0, high=3600)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {"slept": seconds}

    cmd_block = DemoAgent.cmd_sleep  # time.sleep: blocks the event loop

    def snapshot(self):
        """The demo's state plus the cancellations seen."""
        return {**super().snapshot(), "cancelled": self.cancelled}
