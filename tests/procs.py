"""Process helpers for tests: waiting for processes to die on pidfds, not by polling."""

import os
import random
import select
import socket
import subprocess
import sys
import time


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait until every pid has exited (a zombie counts as exited); return those still running."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(fds), [], [], remaining)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CORRAL_MAIN = [sys.executable, "-c", "from corral.web.cli import main; raise SystemExit(main())"]


# The sandbox uids of this test run: a range of its own (by the runner's pid), so what other corral
# servers on the host hold (a production server, a benchmark, another checkout's tests) never makes
# a test's spawn answer 503 out_of_uids. Test servers get it as their default; tests still pass
# --sandbox-uid-range where the range matters.
_RUN_UID_BASE = 1_000_000 + (os.getpid() % 4000) * 1000
TEST_UID_RANGE = f"{_RUN_UID_BASE}-{_RUN_UID_BASE + 999}"


def own_sandbox_uids() -> tuple[str, str]:
    """A sandbox uid range of a test's own: the default one may be all in use by other servers on the host."""
    base = random.randrange(300_000, 900_000, 100)
    return "--sandbox-uid-range", f"{base}-{base + 99}"


def start_server(tmp_path, *args, env=None, program=CORRAL_MAIN, cwd=None, popen=None,
                 port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``corral serve`` as a real subprocess; return it and its base URL once it answers.

    ``program`` is how ``corral`` is run (``python -c``, which puts the current directory on
    sys.path, unless given the installed console script); ``cwd`` where; ``popen`` more Popen
    arguments (``user=`` to run it as another user); ``port`` the port to serve on (a free one if None).
    """
    port = port or free_port()
    cmd = [
        *program, "serve",
        "--port", str(port), "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), *args,
    ]
    proc = subprocess.Popen(cmd, env={"CORRAL_SANDBOX_UID_RANGE": TEST_UID_RANGE, **os.environ, **(env or {})}, stderr=open(tmp_path / "serve.log", "ab"), cwd=cwd,
                            **(popen or {}))
    wait_for_port(port, proc, tmp_path / "serve.log")
    return proc, f"http://127.0.0.1:{port}"


def wait_for_port(port: int, proc: subprocess.Popen, log=None, timeout: float = 30.0) -> None:
    """Wait until a started server (any program) accepts connections on port; raise with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the port opening is the event; connect() is how it is seen
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text() if log else ''}")
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{proc.args[0]} did not open port {port} within {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    """Every process below pid."""
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]
