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
