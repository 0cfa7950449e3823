"""The agents' network namespace: made once per zygote, with only ``lo``, and the gateway's door in it.

Every agent forked by the zygote lives in this namespace: it sees no interface of the host, so
127.0.0.1:5432, corral's own port and 169.254.169.254 are out of reach, and nothing it binds is
seen by the host's clients. Its one way out is a listening socket made here (on the namespace's
loopback) and handed to the supervisor, whose loop serves it as the egress gateway
(supervisor/egress/). A socket keeps the namespace it was made in, so the supervisor accepts on it
from the host's namespace. As root the zygote unshares directly; unprivileged, it does so inside
its own user namespace (agent_proc/userns.py), before it drops the capabilities that gave it.
Stdlib + ctypes; ``lo`` is brought up with one ioctl, not by running ``ip``.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

__all__ = ["CLONE_NEWNET", "PROXY_VARIABLES", "enter_network_namespace", "bring_loopback_up", "gateway_listener",
           "reserve_proxy_variables"]

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: the name, then ifr_flags (a short) in the 24-byte union
GATEWAY_HOST = "127.0.0.1"
_libc = ctypes.CDLL(None, use_errno=True)
# What every agent is given (by the spawn request's env) to find the gateway.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")


def enter_network_namespace() -> None:
    """Move into a new network namespace (needs CAP_SYS_ADMIN in our user namespace) and bring ``lo`` up."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    bring_loopback_up()


def bring_loopback_up() -> None:
    """Set IFF_UP on ``lo`` (a new namespace's loopback starts down): SIOCGIFFLAGS, then SIOCSIFFLAGS."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0)
        name, flags = struct.unpack(_IFREQ, fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack(_IFREQ, name, flags | _IFF_UP))


def gateway_listener(backlog: int = 1024) -> socket.socket:
    """A TCP listener on this namespace's loopback, any free port: the agents' door to the gateway."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((GATEWAY_HOST, 0))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def reserve_proxy_variables() -> None:
    """Give the zygote's environment the proxy variables (empty) every agent will set.

    Each agent then replaces values instead of adding names: os.environ's table and the C library's
    environ array stay the zygote's (shared) pages, not a copy grown in every agent.
    """
    os.environ.update(dict.fromkeys(PROXY_VARIABLES, ""))
