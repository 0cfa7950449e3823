"""Trivial agents the benchmarks run, so the figures measure corral, not an agent's work."""

from corral import Agent


class EchoAgent(Agent):
    """Answers every message with the message itself, in one piece."""

    def on_message(self, text):
        """Echo the text back."""
        return text


class StreamAgent(Agent):
    """Streams ``chunks`` small chunks per message (default 100): the streaming path's figure."""

    chunks = 100

    def on_message(self, text):
        """Yield the text ``chunks`` times."""
        for _ in range(self.chunks):
            yield text


class FloodAgent(EchoAgent):
    """On the ``flood`` command, prints lines of 1000 ``\\x01`` bytes as fast as it can for ``seconds``."""

    def on_command(self, command, args):
        """Flood stdout; return how many lines it wrote."""
        import sys
        import time

        line, lines = "\x01" * 1000 + "\n", 0
        deadline = time.monotonic() + float(args["seconds"])
        while time.monotonic() < deadline:
            for _ in range(100):
                sys.stdout.write(line)
            lines += 100
        sys.stdout.flush()
        return {"lines": lines}
