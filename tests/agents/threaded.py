"""An agent whose module leaves a thread running when it is imported (a library's background thread)."""

import threading

from tests.core_agents import ForkFacts

_stop = threading.Event()
threading.Thread(target=_stop.wait, daemon=True, name="background").start()


class ThreadedForkFacts(ForkFacts):
    """ForkFacts, imported with a second thread in the zygote."""
