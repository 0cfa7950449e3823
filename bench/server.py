"""Start the servers under test the way a user runs them, as subprocesses, and find their processes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
from tests.procs import free_port

# What every corral server of the suite runs with unless a figure says otherwise: no rate limit
# (the load generator sends far more than 20 msg/s per session), room for the scale run, and the
# echo agent so the figures are corral's cost, not an agent's.
BENCH_SETTINGS = {
    "agent": "bench.agents:EchoAgent",
    "max_sessions": 1200,
    "rate_limit": 0,
    "mailbox_size": 32,
    "memory_limit": "512M",
    "idle_timeout": 3600,
    "log_level": "warning",
}


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    """Wait until GET /health answers (the server is up); raise if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.05)  # a harness waiting for a port, not server code
    raise RuntimeError("server did not become healthy in time")


class Server:
    """One server subprocess: ``corral serve`` or the bare baseline."""

    def __init__(self, name: str, argv: list[str], env: dict, port: int, tmp: tempfile.TemporaryDirectory):
        self.name, self.argv, self.env, self.port, self.tmp = name, argv, env, port, tmp
        self.proc: subprocess.Popen | None = None
        self.health: dict = {}

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        # its log to a file: a pipe nobody reads fills up (64 KiB) and blocks the server in a write
        self.log = open(os.path.join(self.tmp.name, "server.log"), "wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            self.health = wait_healthy(self.port, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM and wait (corral stops every agent on the way out)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        self.tmp.cleanup()

    def process(self) -> psutil.Process:
        """The server process."""
        return psutil.Process(self.proc.pid)

    def agents(self) -> list[psutil.Process]:
        """The agent processes (children of the zygote), found by their title."""
        found = []
        for child in self.process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.cmdline()[:1] and child.cmdline()[0].startswith("corral: agent"):
                    found.append(child)
        return found


def corral(store: str = "memory", loop: str | None = None, env: dict | None = None, **overrides) -> Server:
    """A ``corral serve`` subprocess with the bench settings (and ``store`` = memory | sqlite; ``env``
    adds variables, such as an agent's configuration)."""
    tmp = tempfile.TemporaryDirectory(prefix="corral-bench-")
    port = free_port()
    settings = {**BENCH_SETTINGS, **overrides, "port": port, "data_dir": os.path.join(tmp.name, "data")}
    if loop is not None:
        settings["loop"] = loop
    if store == "memory":
        settings["database_url"] = "memory://"
    argv = [os.path.join(os.path.dirname(sys.executable), "corral"), "serve"]
    for name, value in settings.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return Server(f"corral/{store}", argv, {**bench_env(), **(env or {})}, port, tmp)


def bare(loop: str | None = None, module: str = "bench.bare") -> Server:
    """A baseline server subprocess: the bare aiohttp handler, ``bench.naive_zmq`` or ``bench.fake_openai``."""
    tmp = tempfile.TemporaryDirectory(prefix="corral-bench-")
    port = free_port()
    argv = [sys.executable, "-m", module, "--port", str(port)]
    if loop is not None:
        argv += ["--loop", loop]
    return Server(module, argv, bench_env(), port, tmp)


def bench_env() -> dict:
    """The environment of a server subprocess: this checkout importable, no CORRAL_ overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env
