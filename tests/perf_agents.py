"""Small agents for the hot-path tests."""

from corral import Agent


class WholeReplyAgent(Agent):
    """Returns its reply whole (a string), never streams."""

    def on_message(self, text):
        """Echo the text back in one piece."""
        return text


class ChunkyAgent(Agent):
    """Streams its reply as the text three times, chunk by chunk."""

    def on_message(self, text):
        """Yield the text three times."""
        yield from (text, text, text)
