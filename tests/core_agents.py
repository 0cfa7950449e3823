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
