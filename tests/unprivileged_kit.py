"""Running a real corral server as an unprivileged user the tests made (tests/test_sandbox.py's ``useradd``).

The user must be able to run a Python of this version and read corral and its dependencies. Where
this interpreter lives under a directory others cannot enter (pyenv in root's 0700 home), another
interpreter of the same version is looked for (the system's), and a throwaway venv is made for it
whose ``.pth`` adds this environment's site-packages (their own ``.pth`` files too, so the editable
install's import hook loads). The zygote is started with that venv's python, so it works as well.
"""

import os
import pwd
import subprocess
import sys

from corral.supervisor.sandbox_plan import unreadable_for_others
from tests.procs import CORRAL_MAIN, start_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"


class NoPython(Exception):
    """No Python the unprivileged user can run corral with; the message says why."""


def gid_of(uid: int) -> int:
    """The primary group of ``uid`` (ours when it is us)."""
    return os.getegid() if uid == os.geteuid() else pwd.getpwuid(uid).pw_gid


def as_user(uid: int) -> dict:
    """Popen arguments that run the child as ``uid`` (its own group, no supplementary ones); none when we are it."""
    if uid == os.geteuid():
        return {}
    return {"user": uid, "group": gid_of(uid), "extra_groups": []}


def site_dirs() -> list[str]:
    """This environment's site-packages directories (the venv's and the base's)."""
    return [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]


def _candidates() -> list[str]:
    """Interpreters of this version: ours, then the usual system places."""
    paths = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", sys.executable)]
    paths += [f"{prefix}/bin/python{VERSION}" for prefix in ("/usr", "/usr/local", "/opt/python")]
    return [p for p in dict.fromkeys(os.path.realpath(p) for p in paths) if os.path.isfile(p)]


def user_python(uid: int, parent: str) -> str:
    """A python the user can run corral with (a small venv under ``parent``); raises NoPython saying why."""
    blocked = unreadable_for_others([REPO, *site_dirs()]) if uid != os.geteuid() else []
    if blocked:
        raise NoPython(f"the unprivileged user cannot read {', '.join(blocked)}")
    tried = []
    for base in _candidates():
        if uid != os.geteuid() and unreadable_for_others([base]):
            tried.append(f"{base}: under a directory others cannot enter")
            continue
        python = _venv(base, parent)
        done = subprocess.run([python, "-c", "import corral.web.cli, tests.agents.hostile"], cwd=REPO,
                              capture_output=True, text=True, **as_user(uid))
        if done.returncode == 0:
            return python
        tried.append(f"{base}: {done.stderr.strip().splitlines()[-1:]}")
    raise NoPython(f"no Python {VERSION} the unprivileged user can run corral with ({'; '.join(tried) or 'none found'})")


def _venv(base: str, parent: str) -> str:
    """A venv for ``base`` (no pip) whose one .pth adds this environment's site dirs; its python."""
    root = os.path.join(parent, "venv" + base.replace("/", "-"))
    packages = os.path.join(root, "lib", f"python{VERSION}", "site-packages")
    os.makedirs(packages, exist_ok=True)
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    with open(os.path.join(root, "pyvenv.cfg"), "w") as f:
        f.write(f"home = {os.path.dirname(base)}\ninclude-system-site-packages = false\nversion = {VERSION}\n")
    python = os.path.join(root, "bin", "python3")
    if not os.path.lexists(python):
        os.symlink(base, python)
    with open(os.path.join(packages, "corral-tests.pth"), "w") as f:
        f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site_dirs()) + "\n")
    return python


def serve_as_user(uid: int, python: str, home, *args, prelude: str = "") -> tuple[subprocess.Popen, str]:
    """``corral serve`` as ``uid`` with ``python`` (data and run dir in ``home``, which it owns); the process and URL.

    ``prelude`` is Python run first in the server's own process (e.g. moving itself into a cgroup).
    """
    os.chown(home, uid, -1)
    code = CORRAL_MAIN[-1] if not prelude else f"{prelude}; {CORRAL_MAIN[-1]}"
    return start_server(home, *args, program=[python, "-c", code], cwd=REPO, env={"HOME": str(home)},
                        popen=as_user(uid))



def drop_capability(cap: int) -> None:
    """Lose one capability for good (bounding, effective, permitted, inheritable), as a container's root would lack it."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    words = list(struct.unpack("=6I", data.raw))
    for i in range(3):  # (effective, permitted, inheritable) of caps 0-31, then of 32-63
        words[i + 3 * (cap // 32)] &= ~(1 << (cap % 32))
    if libc.capset(header, struct.pack("=6I", *words)) != 0:
        raise OSError(ctypes.get_errno(), "capset")
