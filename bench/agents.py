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


class TickAgent(Agent):
    """Streams a delta ``rate`` times a second for ``seconds`` (the message: "RATE SECONDS"); each delta
    is the wall time it was made, so a client on the same host reads each delta's latency."""

    def on_message(self, text):
        """Yield time.time() at the given rate."""
        import time

        rate, seconds = (float(x) for x in text.split())
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            yield f"{time.time():.6f}"
