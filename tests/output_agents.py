"""Agents that write to stdout and stderr, for the agent output tests."""

import os
import sys

from corral.agent_proc.demo import DemoAgent


class Printer(DemoAgent):
    """Prints on request: lines to either stream, floods, long lines, and output of a child program."""

    def cmd_say(self, args):
        """Print args['text'] to args['stream'] (stdout or stderr)."""
        print(args["text"], file=sys.stderr if args.get("stream") == "stderr" else sys.stdout)
        return {"said": args["text"]}

    def cmd_flood(self, args):
        """Write args['bytes'] bytes of lines; report how many bytes the pipe dropped instead of waiting."""
        line = "x" * 99 + "\n"
        for _ in range(args["bytes"] // len(line)):
            sys.stdout.write(line)
        sys.stdout.flush()
        return {"written": args["bytes"], "dropped": sys.stdout.buffer.raw.dropped_total}

    def cmd_long(self, args):
        """One line of args['chars'] characters, then a short one."""
        print("y" * args["chars"])
        print("after the long line")
        return {}

    def cmd_child(self, args):
        """Run a program that writes to the inherited fd 1."""
        os.system("echo from a child program")
        return {}

    def cmd_flood_control(self, args):
        """Print lines of args['width'] \\x01 bytes as fast as it can for args['seconds']; how many it wrote."""
        import time

        line, written = "\x01" * int(args.get("width", 1000)) + "\n", 0
        deadline = time.monotonic() + float(args["seconds"])
        while time.monotonic() < deadline:
            for _ in range(100):
                sys.stdout.write(line)
            written += 100
        sys.stdout.flush()
        return {"lines": written, "dropped_bytes": sys.stdout.buffer.raw.dropped_total}
