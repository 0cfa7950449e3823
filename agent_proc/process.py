"""Process-level set-up shared by the zygote and agents: titles, parent-death signal, loading."""

import ctypes
import importlib
import os
import signal

from setproctitle import setproctitle

_PR_SET_PDEATHSIG = 1
_libc = None


def set_title(title: str) -> None:
    """Set the title ``ps``/``top`` show for this process."""
    setproctitle(title)


def agent_title(session_id: str, tenant: str, busy: bool) -> str:
    """The title of an agent process."""
    return f"corral: agent sid={session_id[:12]} tenant={tenant} {'busy' if busy else 'idle'}"


def die_with_parent(expected_parent: int) -> None:
    """Ask the kernel to SIGKILL us when our parent dies; exit now if it already has.

    The check after arming closes the race where the parent died before prctl ran.
    """
    arm_death_signal()
    if os.getppid() != expected_parent:
        os._exit(1)


def arm_death_signal() -> None:
    """Ask the kernel to SIGKILL us when our parent dies (the caller checks it has not already)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def load_agent_class(spec: str):
    """Import ``pkg.module:Class`` and return the class."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"agent must look like pkg.module:Class, got {spec!r}")
    module = importlib.import_module(module_name)
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name} has no attribute {attr!r}") from None
    return cls
