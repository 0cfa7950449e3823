"""The C library, for the system calls Python does not wrap (prctl, unshare, capset, landlock ...).

One handle for the sandbox layers (agent_proc/sandbox.py) and the zygote's user namespace
(agent_proc/userns.py). ctypes caches each function on its first lookup, so the zygote looks up
the ones its children call before it forks (``Prebuilt``).
"""

import ctypes
import os

LIBC = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> int:
    """Raise OSError with errno when a libc/syscall wrapper returned -1."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
