"""Small agents for the core tests."""

import os
import time

from agent_proc.demo import DemoAgent


class ForkingAgent(DemoAgent):
    """Forks a grandchild that would outlive it if nothing killed it."""

    def cmd_fork(self, args):
        """Fork a sleeper; return its pid."""
        pid = os.fork()
        if pid == 0:
            time.sleep(300)
            os._exit(0)
        return {"child": pid}
