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


class BurstAgent(Agent):
    """Streams a burst the test can catch whole: the message is "COUNT GO SENT", two FIFOs of the
    test's (it runs unsandboxed). It waits until GO is written, yields COUNT chunks as fast as it
    can, then writes SENT: every chunk's frame is on its connection by then."""

    def on_message(self, text):
        """Wait at the gate, burst, report."""
        count, go, sent = text.split()
        with open(go) as gate:
            gate.read()
        for i in range(int(count)):
            yield f"{i} "
        with open(sent, "w") as report:
            report.write("sent")
