"""Small agents for the core tests."""

import asyncio
import os
import time

from corral import Agent
from corral.agent_proc.demo import AsyncDemoAgent, DemoAgent


class ForkingAgent(DemoAgent):
    """Forks a grandchild that would outlive it if nothing killed it."""

    def cmd_fork(self, args):
        """Fork a sleeper; return its pid."""
        pid = os.fork()
        if pid == 0:
            time.sleep(300)
            os._exit(0)
        return {"child": pid}

    def cmd_go_deaf(self, args):
        """Ignore SIGINT from now on (as if every signal were lost) until deaf_sleep restores it."""
        import signal

        self._sigint_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return {"deaf": True}

    def cmd_deaf_sleep(self, args):
        """Stay deaf a moment longer, then hear SIGINT again and sleep."""
        import signal

        time.sleep(args.get("deaf", 0.8))
        signal.signal(signal.SIGINT, self._sigint_handler)
        time.sleep(args.get("seconds", 30))
        return {"slept": True}


class AsyncShapes(Agent):
    """Async hooks in every shape ``on_message`` may take; ``on_stop`` leaves a file behind."""

    async def on_message(self, text):
        """``plain``: a string; ``list``: a list of chunks; ``later``: a coroutine handing back an
        async generator; anything else: an async generator of its words."""
        if text == "plain":
            return "a plain reply"
        if text == "list":
            return ["a ", "list ", "reply"]
        if text == "later":
            return self._words("an async generator handed back")
        return self._words(text)  # not awaited: returned as is

    async def _words(self, text):
        """Yield the words of ``text``, yielding to the loop between them."""
        words = text.split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(0)
            yield word if i == len(words) - 1 else word + " "

    async def on_stop(self):
        """Write the session id to the file named in the session's metadata."""
        await asyncio.sleep(0)
        path = self.metadata.get("stop_file")
        if path:
            with open(path, "w") as f:
                f.write(self.session_id)


def announce(args) -> None:
    """Print ``args["announce"]`` (the test hears it as agent output): the hook has begun."""
    print(args["announce"], flush=True)


class AnnouncingAsyncAgent(AsyncDemoAgent):
    """The async demo agent whose ``sleep`` and ``block`` tell the test when they have begun."""

    async def cmd_sleep(self, args):
        """Announce, then await."""
        announce(args)
        return await super().cmd_sleep(args)

    def cmd_block(self, args):
        """Announce, then block the loop."""
        announce(args)
        return super().cmd_block(args)


# What the zygote's fork must keep doing for an agent (tests/test_forking.py). The module's import
# registers at-fork hooks, as a client library that resets its connection pool after a fork would.
fork_hooks = {"before": 0, "in_child": 0}
instances = 0


def _before_fork():
    fork_hooks["before"] += 1


def _after_fork_in_child():
    fork_hooks["in_child"] += 1


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class ForkFacts(DemoAgent):
    """Reports what its process inherited from the fork."""

    def __init__(self, *args, **kwargs):
        global instances
        instances += 1
        super().__init__(*args, **kwargs)

    def cmd_fork_facts(self, args):
        """The random stream, the at-fork hooks seen, how many agents this process has made."""
        import random

        return {"random": random.getrandbits(64), "hooks": dict(fork_hooks), "instances": instances}



SHARED_AT_IMPORT = ("made when the zygote imported this module", 42.5)


class RefcountAgent(DemoAgent):
    """Answers with the reference count of an object its module made at import (in the zygote) and of one made now."""

    def on_message(self, text):
        import sys

        fresh = [text]
        return f"{sys.getrefcount(SHARED_AT_IMPORT)} {sys.getrefcount(fresh)}"
